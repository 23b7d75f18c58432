"""Drop-in modules that carry adapters in place of a model's own modules."""
from ptlm_engine.layers.base import AdapterLayer
from ptlm_engine.layers.lora import LoraLinear
from ptlm_engine.layers.lora_embedding import LoraEmbedding
from ptlm_engine.layers.modules_to_save import ModulesToSave

__all__ = ["AdapterLayer", "LoraEmbedding", "LoraLinear", "ModulesToSave"]
