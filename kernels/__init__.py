"""Triton kernels and their launchers. Imports torch and triton only, never the engine's higher layers."""
