"""AdapterLayer: what every module that carries named adapters offers the API, whatever the method.

LoRA layers, modules_to_save wrappers, bottleneck adapters and the model-level prefix / prompt modules all
derive from it, so that activation, disabling, mixed batches, trainability and removal are written once in
`ptlm_engine.api` and never per method.
"""
from __future__ import annotations

import torch
from torch import nn


def hooked(module: nn.Module) -> bool:
    """Whether calling the module runs more than its class's forward: forward hooks, pre-hooks, backward hooks,
    or an instance-level forward (accelerate's add_hook_to_module sets one, and `_hf_hook`). Code that computes
    the module's output itself, or replaces the module, would silently drop them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__ or hasattr(module, "_hf_hook"))


class AdapterLayer(nn.Module):
    """A module holding adapters by name.

    State the API drives directly:
      active_adapter: the adapter this layer runs outside mixed batches (None: none).
      adapters_enabled: False inside pe.disable_adapters (the layer computes the base model's output).
      slot: adapter name -> model-wide slot id (the index a mixed batch's per-token mapping uses).
    Methods each subclass provides: adapter_names, adapter_parameters, remove_adapter, set_batch and
    release. The API walks a model's AdapterLayers (inject.adapter_layers) and does not look inside them.

    remaps_in_place: a mixed batch's rows reach the layer only through the batch's per-token tensors (index,
    token grouping), which AdapterBatch.remap rewrites in place, so a CUDA graph captured over the layer
    replays a new mapping. Layers that build per-row layouts on the host from the mapping leave it False.
    """

    remaps_in_place = False
    # True from the close of a pe.adapter_batch block that ran a forward until this layer's next forward: a
    # backward after the block that recomputes the forward (gradient checkpointing) would run without the
    # block's mapping, so check_recomputation refuses it.
    after_block = False

    def __init__(self):
        super().__init__()
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        self.slot: dict[str, int] = {}

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def check_recomputation(self) -> None:
        """The first forward after a training block closed: RuntimeError where it runs inside a backward (gradient
        checkpointing recomputing the block's forward, whose rows' adapters the layer no longer knows)."""
        self.after_block = False
        if torch._C._current_graph_task_id() >= 0:
            raise RuntimeError("gradient checkpointing recomputed a forward of a pe.adapter_batch block after the "
                               "block closed, without its per-row adapters: call backward inside the block (with "
                               "HF Trainer, open it in training_step rather than compute_loss)")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The Parameters adapter `name` trains in this layer (made trainable when it is active or mapped)."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        raise NotImplementedError

    def set_batch(self, batch) -> None:
        """Run a mixed batch's per-row mapping (a pool.AdapterBatch), or None to go back to active_adapter."""
        raise NotImplementedError

    def release(self) -> nn.Module | None:
        """Called when the layer's last adapter is gone: undo anything the layer installed on the model and
        return the module to put back in its place (the original module it wrapped), or None when the layer
        was added to the model rather than wrapping a module (its attribute is then deleted)."""
        raise NotImplementedError


def autocast_on(t: torch.Tensor) -> bool:
    """Whether autocast is on for `t`'s device (the meta device has none: shape inference on meta tensors)."""
    return t.device.type != "meta" and torch.is_autocast_enabled(t.device.type)
