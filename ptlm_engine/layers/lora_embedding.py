"""LoraEmbedding: an nn.Embedding with named LoRA adapters (HF PEFT's LoRA Embedding), computed by the fused op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlm_engine import functional
from ptlm_engine.layers.lora import LoraLinear


def check_embedding(name: str, module: nn.Embedding) -> None:
    """ValueError unless LoraEmbedding can stand in for `module`: nn.Embedding's own lookup, optionally scaled by an
    `embed_scale` (transformers' scaled word embeddings), without the options whose rules the fused op lacks."""
    plain = type(module).forward is nn.Embedding.forward
    if not plain and getattr(module, "embed_scale", None) is None:
        raise ValueError(f"target module {name!r} is a {type(module).__module__}.{type(module).__name__}, an "
                         "embedding with its own forward, which LoRA cannot wrap: target token embeddings")
    for option, value in (("max_norm", module.max_norm), ("scale_grad_by_freq", module.scale_grad_by_freq),
                          ("sparse", module.sparse)):
        if value:
            raise ValueError(f"target module {name!r}: an embedding with {option}={value!r}, which LoRA "
                             "embeddings here do not implement")


class LoraEmbedding(LoraLinear):
    """y = es (E[ids] + scale · A[:, ids]ᵀ Bᵀ) with the active adapter (es: the table's own output scale, as
    Gemma's scaled embeddings; 1 for a plain nn.Embedding); the base lookup when no adapter is active, adapters
    are disabled, or the active one is merged into E.

    A LoraLinear over one-hot inputs: `weight` is the table E (V, d), read as a fan_in_fan_out weight (d_in = V,
    d_out = d), so adapters (lora_A (r, V), lora_B (d, r), PEFT's lora_embedding_A / _B), their stacked pool,
    mixed batches, merging and the API's bookkeeping are LoraLinear's. As in PEFT: a new adapter has A = 0 and
    B normal (the identity), LoRA dropout does not apply, and A's column padding_idx gets no gradient.
    """

    file_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base: nn.Embedding):
        super().__init__(base, fan_in_fan_out=True)
        self.padding_idx = base.padding_idx
        self._embed_scale: float | None = None             # es as a Python float, read once (see embed_scale)

    @staticmethod
    @torch.no_grad()
    def init_adapter(lora_A: Tensor, lora_B: Tensor) -> None:
        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, slot: int | None = None) -> None:
        super().add_adapter(name, r, scale, 0.0, slot)      # PEFT's LoRA embedding applies no dropout

    def release(self) -> nn.Module:
        original = self.original_module
        original.weight = self.weight
        return original

    def embed_scale(self) -> float:
        """The table's output scale as a float for the fused op: a constant, read from the original module once
        (a tensor buffer would cost a device sync at every call)."""
        if self._embed_scale is None:
            es = getattr(self.original_module, "embed_scale", None)
            self._embed_scale = 1.0 if es is None else float(es)
        return self._embed_scale

    def _base_forward(self, ids: Tensor) -> Tensor:
        y = F.embedding(ids, self.weight, self.padding_idx)
        es = getattr(self.original_module, "embed_scale", None)
        return y if es is None else y * (es.to(y.dtype) if isinstance(es, Tensor) else es)

    def forward(self, ids: Tensor) -> Tensor:
        if self.after_block and self.batch is None:
            self.check_recomputation()
        if self.batch is not None and self.adapters_enabled:
            return self._batch_forward(ids)
        name = self.active_adapter
        if not self.adapters_enabled or self.merged_adapter is not None or name not in self.lora_A:
            return self._base_forward(ids)
        lora_A, lora_B = self._adapter_weights(name, self.weight.dtype)
        return functional.lora_embedding(ids, self.weight, lora_A, lora_B, self.scale[name], self.padding_idx,
                                         self.embed_scale())

    def _batch_forward(self, ids: Tensor) -> Tensor:
        index, segments = self.batch.tokens(ids.unsqueeze(-1))   # (...) slot per token; checks the batch size
        if not self.batch_adapters:                              # no row's adapter is in this layer
            return self._base_forward(ids)
        return functional.lora_embedding_multi(ids, self.weight, self.batch_slots(self.weight.dtype), index,
                                               self.padding_idx, self.embed_scale(), segments)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, "
                f"padding_idx={self.padding_idx}, adapters={list(self.lora_A)}, active={self.active_adapter!r}, "
                f"merged={self.merged_adapter!r}")
