"""ptlm_engine: fused-kernel parameter-efficient transfer of pre-trained language models."""
__version__ = "0.1.0"
