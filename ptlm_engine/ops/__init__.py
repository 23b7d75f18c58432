"""Autograd Functions and torch.library custom ops; each op picks a Triton launcher or the reference."""
