"""A training step (forward, loss, backward, optional gradient clipping, optimizer step) captured once in a CUDA
graph and replayed: the step's host work (the model's eager ops, autograd, Triton launches, the optimizer's foreach
calls) is paid once at capture instead of at every step.

A LoRA step of a small model on a fast GPU is host-bound: at ~20-50 µs of host time per eager op or launch, the
few thousand of one Llama step cost about as much as its kernels. A replay issues them all at once.

    step = pe.capture_train_step(model, optimizer, {"input_ids": ids, "labels": ids})
    for batch in loader:            # the same keys, shapes and dtypes as the example
        loss = step(batch)          # copies the batch into the captured inputs and replays; the loss on the device

The rules are those of whole-network capture in PyTorch:
- Fixed shapes: every batch has the example's tensor keys, shapes and dtypes (pad to a fixed length); its other
  values equal the example's.
- No device-to-host synchronization in the step. ptlm's ops have none; transformers skips its data-dependent mask
  checks while a stream captures (its SDPA attention then gets an explicit causal mask).
- The optimizer must work under capture: Adam / AdamW get capturable=True here (their step counters move to the
  device), SGD works as it is. The learning rate is read at capture: a schedule needs a tensor lr
  (`AdamW(params, lr=torch.tensor(1e-4, device="cuda"), capturable=True)`), which torch's schedulers fill in place.
- `warmup` eager steps run first on a side stream (ptlm's kernels autotune there, the allocator and the
  optimizer state settle). They leave no trace: the trainable parameters and the optimizer state are put back
  afterwards, in place (state the warm-up created is zeroed: Adam's fresh state; an SGD momentum buffer then
  starts from zero, which equals a fresh one without dampening).
- The gradients live in the graph's memory: the parameters' .grad hold the last step's until the next replay.
  Gradient accumulation across calls is not part of the step.
- Mixed batches: captured inside one `pe.adapter_batch` block, the step trains the block's adapters on each
  row's own adapter; `pe.remap_adapter_batch` between calls gives the rows other adapters of the block
  (LoRA and bottleneck adapters: it rewrites the batch's token tensors in place, which the graph reads).
- Off CUDA, or with graph=False, the same object runs the step eagerly (a plain loop with the same arguments).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ptlm_engine.pool import note_parameter_writes


def _output_loss(output) -> Tensor:
    """A transformers output's loss (attribute or key), or the output itself when it is the loss."""
    if isinstance(output, Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model's output has no loss: pass labels in the batch, or a loss_fn")
    return loss


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _device(example: Mapping[str, Any]) -> torch.device:
    devices = {v.device for v in example.values() if isinstance(v, Tensor)}
    if len(devices) != 1:
        raise ValueError(f"the example batch must hold tensors on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def _make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """capturable=True where the optimizer has the option (Adam, AdamW, ...), its step counters moved to the
    parameters' devices as capturable steps keep them."""
    for group in optimizer.param_groups:
        if "capturable" not in group or group["capturable"]:
            continue
        group["capturable"] = True
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


class _Snapshot:
    """The trainable parameters' values and the optimizer state, put back in place by restore()."""

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.values = [p.detach().clone() for p in params]
        self.params = params
        self.state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
                      for p in params if p in optimizer.state}

    @torch.no_grad()
    def restore(self) -> None:
        for p, value in zip(self.params, self.values):
            p.copy_(value)
            state = self.optimizer.state.get(p)
            if not state:
                continue
            saved = self.state.get(p, {})
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and key in saved:
                    value.copy_(saved[key])
                elif isinstance(value, Tensor):
                    value.zero_()
                else:
                    state[key] = saved.get(key, type(value)(0) if isinstance(value, (int, float)) else value)


class CapturedTrainStep:
    """One training step of `model` with `optimizer` on batches shaped like `example`, captured in a CUDA graph
    (see the module docstring). Call it with a batch: the step's loss, on the device."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example: Mapping[str, Any], *,
                 loss_fn: Callable[[Any], Tensor] | None = None, max_grad_norm: float | None = None,
                 warmup: int = 3, graph: bool | None = None):
        if not example:
            raise ValueError("the example batch is empty")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager steps before the capture), got {warmup}")
        device = _device(example)
        self.graphed = device.type == "cuda" if graph is None else bool(graph)
        if self.graphed and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the batch on a CUDA device, got {device}")
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or _output_loss
        self.max_grad_norm = max_grad_norm
        self.params = _params(optimizer)
        self.inputs = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in example.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None
        if self.graphed:
            self._capture(device, warmup)

    def _forward_backward_step(self) -> Tensor:
        loss = self.loss_fn(self.model(**self.inputs))
        loss.backward()
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _eager_step(self) -> Tensor:
        # As a replay: this batch's gradients alone (none left from before), and in .grad after the step.
        self.optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_step()

    def _capture(self, device: torch.device, warmup: int) -> None:
        _make_capturable(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        snapshot = _Snapshot(self.params, self.optimizer)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):        # warm-up off the default stream, as capture requires for autograd
            for _ in range(warmup):
                self._eager_step()
        torch.cuda.current_stream(device).wait_stream(side)
        snapshot.restore()
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()             # the warm-up's cached activations: the graph takes its own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):   # grads are None here: backward allocates them in the graph's pool
            self.loss = self._forward_backward_step()

    def _load(self, batch: Mapping[str, Any]) -> None:
        if batch.keys() != self.inputs.keys():
            raise ValueError(f"the batch's keys {sorted(batch)} differ from the captured {sorted(self.inputs)}")
        for key, value in batch.items():
            static = self.inputs[key]
            if isinstance(static, Tensor):
                if not isinstance(value, Tensor) or value.shape != static.shape or value.dtype != static.dtype:
                    got = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"batch[{key!r}] must be a tensor of shape {tuple(static.shape)} and dtype "
                                     f"{static.dtype} (the captured example's), got {got}")
            elif value is not static and value != static:
                raise ValueError(f"batch[{key!r}] must equal the captured example's {static!r}, got {value!r}")
        for key, value in batch.items():
            if isinstance(value, Tensor):
                self.inputs[key].copy_(value, non_blocking=True)

    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        self._load(batch)
        if self.graph is None:
            return self._eager_step()
        self.graph.replay()
        note_parameter_writes()              # the replayed optimizer step runs no hook and bumps no version counter
        return self.loss.clone()             # the graph's loss is overwritten by the next replay


def capture_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, example: Mapping[str, Any], *,
                       loss_fn: Callable[[Any], Tensor] | None = None, max_grad_norm: float | None = None,
                       warmup: int = 3, graph: bool | None = None) -> CapturedTrainStep:
    """`model`'s training step with `optimizer` on batches like `example` (keyword arguments of the model's
    forward), captured in a CUDA graph on CUDA (graph=None), eager elsewhere or with graph=False. loss_fn maps the
    model's output to the loss (default: its `loss`); max_grad_norm clips the gradients' total norm inside the
    step. See the module docstring for the rules."""
    return CapturedTrainStep(model, optimizer, example, loss_fn=loss_fn, max_grad_norm=max_grad_norm,
                             warmup=warmup, graph=graph)
