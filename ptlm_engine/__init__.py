"""ptlm_engine: fused-kernel parameter-efficient transfer of pre-trained language models."""
from ptlm_engine.api import (active_adapter, adapter_batch, adapter_configs, add_adapter, disable_adapters,
                             merge_adapter, remap_adapter_batch, remove_adapter, set_active_adapter, unload,
                             unmerge_adapter)
from ptlm_engine.base_ops import fuse_base_ops, unfuse_base_ops
from ptlm_engine.captured_step import CapturedTrainStep, capture_train_step
from ptlm_engine.config import BottleneckConfig, LoraConfig, PrefixConfig, PromptConfig
from ptlm_engine.io import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = ["LoraConfig", "BottleneckConfig", "PrefixConfig", "PromptConfig", "add_adapter", "set_active_adapter",
           "active_adapter", "adapter_configs", "save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter",
           "disable_adapters", "adapter_batch", "remap_adapter_batch", "remove_adapter", "unload", "fuse_base_ops",
           "unfuse_base_ops", "capture_train_step", "CapturedTrainStep"]
