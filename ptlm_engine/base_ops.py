"""Switch a transformers model's frozen base onto the fused base-model ops (RMSNorm, silu(gate) * up, RoPE, the
causal-LM loss), and back.

HF's eager code spends a LoRA training step's elementwise time in these: LlamaRMSNorm upcasts to fp32 in ~6
kernels, rotate_half RoPE takes ~8, act_fn(gate) * up 2, and their autograd saves fp32 intermediates; its causal-LM
loss makes several GB-sized passes over the logits (and sets the step's peak memory). The four switches are driven
by the small tables below, never by copies of model code:

- RMSNorm: every module whose class name is in RMS_NORM_CLASSES (Llama's formula; GemmaRMSNorm's (1 + weight) is
  not) with a (d,) `weight` and a float `variance_epsilon` is replaced in place by layers.rms_norm.FusedRMSNorm,
  which holds the same weight Parameter (state-dict keys and optimizers unchanged) and gives the module back.
- Gated MLP: a module of GATED_MLP_CLASSES with gate_proj, up_proj, down_proj and a SiLU `act_fn` gets an
  instance-level forward, down_proj(silu_mul(gate_proj(x), up_proj(x))): the projections are still called as
  modules, so LoRA layers in their place (and their grouped gate/up call) work, whichever of fuse_base_ops and
  add_adapter comes first.
- RoPE: the modeling modules of ROTARY_FUNCTIONS call a module-level apply_rotary_pos_emb from their attention's
  forward. The function is replaced there by a wrapper, and every attention module of the model that calls it gets
  a forward pre-hook and hook (`_RotaryScope`) that mark, per thread, that a fused attention is running. The
  wrapper runs functional.apply_rotary only there and where the fused op takes the inputs (Triton enabled for them,
  one supported dtype, HF's shapes); anywhere else (another model of that architecture in the process, say) it
  calls the original function. The scopes hold the patch: the unfuse of the last model holding it puts the original
  function back (a model collected without unfuse_base_ops stops holding it, and the next unfuse_base_ops call of
  any model restores what no live model holds); a deep copy or an unpickled fused model holds it again.

- Loss: a causal LM of CAUSAL_LM_CLASSES (transformers' ForCausalLMLoss on lm_head(model(...)) logits; not
  Gemma2's softcapped logits) whose lm_head is a plain nn.Linear (no adapter layer, no hooks) gets an instance-level
  forward (with the class forward's signature, for inspect; holding the model weakly). A training call
  (model.training, grad enabled, `labels` given) runs the decoder `model.model` as the class forward does, shifts
  the labels as ForCausalLMLoss does (padded on the right with ignore_index, shifted by one; or `shift_labels`,
  flat or not), and takes the loss with
  functional.linear_cross_entropy on the final hidden states: the (T, V) logits, their fp32 upcast and their fp32
  gradient are never materialized. It returns CausalLMOutputWithPast with that loss and logits=None (as Liger's
  fused loss does: a training step does not see logits). `num_items_in_batch`, `ignore_index`, `shift_labels` are
  honoured; every keyword goes to the decoder as in transformers. Under autocast the hidden states and the head's
  weight are cast to the autocast dtype first, as F.linear's autocast would. Every other call (eval mode, no_grad,
  no labels, positional arguments, logits_to_keep != 0, return_dict=False, a loss_function other than
  ForCausalLMLoss, an adapter or hooks on lm_head by then) runs the class forward unchanged.

Modules inside adapter layers (a ModulesToSave's copies, say) are left alone, and so are modules with an
instance-level forward of someone else's (accelerate's hooks) and RMSNorm modules with hooks (replacing them
would drop the hooks; an MLP's hooks, a bottleneck adapter's say, keep working with the fused forward).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import threading
import types
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ptlm_engine import functional
from ptlm_engine.layers.base import AdapterLayer, autocast_on, hooked
from ptlm_engine.layers.modules_to_save import ModulesToSave
from ptlm_engine.layers.rms_norm import FusedRMSNorm
from ptlm_engine.ops.rotary import apply_checked, runs_fused

# transformers' RMSNorm classes that compute weight * cast(x * rsqrt(mean(x^2) + eps)), matched by class name.
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# modeling module -> the name of its module-level rotate_half RoPE function, which its attention calls.
ROTARY_FUNCTIONS = {
    "transformers.models.llama.modeling_llama": "apply_rotary_pos_emb",
    "transformers.models.mistral.modeling_mistral": "apply_rotary_pos_emb",
    "transformers.models.qwen2.modeling_qwen2": "apply_rotary_pos_emb",
    "transformers.models.qwen3.modeling_qwen3": "apply_rotary_pos_emb",
}

# transformers' gated MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)), matched by class name (other
# MLPs of that shape scale, clamp or upcast in between: FalconH1's multipliers, DeepseekV4's swiglu_limit).
GATED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
# causal LMs whose loss is transformers' ForCausalLMLoss on lm_head(model(...)) logits, matched by class name.
CAUSAL_LM_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})

# modeling module -> (its original function, the _RotaryScope objects holding the patch)
_ROTARY_PATCHES: dict[str, tuple[Callable, weakref.WeakSet]] = {}


def _silu_classes() -> tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation
        return nn.SiLU, SiLUActivation
    except ImportError:  # older transformers: ACT2FN["silu"] is nn.SiLU
        return (nn.SiLU,)


def _modules(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every module below `module`, not descending into adapter layers."""
    for name, child in module._modules.items():
        if child is None:
            continue
        yield module, name, child
        if not isinstance(child, AdapterLayer):
            yield from _modules(child)


def _every_module(module: nn.Module) -> Iterator[tuple[nn.Module, str | None, nn.Module]]:
    """(parent, attribute name, child) for every module below `module`, inside adapter layers too (a modules_to_save
    copy made of a fused module is fused), and each ModulesToSave's original module, held outside the tree (name
    None). A child shared by two parents (a wrapper and its original) comes once per parent."""
    for name, child in module._modules.items():
        if child is not None:
            yield module, name, child
            yield from _every_module(child)
    if isinstance(module, ModulesToSave):
        yield module, None, module.original_module
        yield from _every_module(module.original_module)


def _own_forward(module: nn.Module) -> bool:
    """No instance-level forward (accelerate's hooks, say): the class's forward is what runs."""
    return "forward" not in module.__dict__


# ---------------------------------------------------------------------------------------------------- RMSNorm
def _fusable_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__ in RMS_NORM_CLASSES and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float) and not hooked(module))


def _fuse_norms(model: nn.Module) -> None:
    fused: dict[int, FusedRMSNorm] = {}              # a module shared by two parents gets one replacement
    for parent, name, child in list(_modules(model)):
        if _fusable_norm(child):
            if id(child) not in fused:
                fused[id(child)] = FusedRMSNorm(child)
            parent._modules[name] = fused[id(child)]


# -------------------------------------------------------------------------------------------------- gated MLP
class _GatedMLPForward:
    """A fused MLP's instance-level forward, down_proj(silu_mul(gate_proj(x), up_proj(x))). It holds the MLP weakly
    (a bound method in the MLP's __dict__ would be a reference cycle: its weights freed only by the garbage
    collector); copy.deepcopy and pickle rebuild it for the copy."""

    def __init__(self, mlp: nn.Module):
        self._mlp = weakref.ref(mlp)

    def __call__(self, x):
        mlp = self._mlp()
        return mlp.down_proj(functional.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))

    def __reduce__(self):
        return type(self), (self._mlp(),)


def _has_fused_forward(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _GatedMLPForward)


def _fusable_mlp(module: nn.Module, silu: tuple[type, ...]) -> bool:
    projections = ("gate_proj", "up_proj", "down_proj")
    return (type(module).__name__ in GATED_MLP_CLASSES
            and all(isinstance(getattr(module, name, None), nn.Module) for name in projections)
            and isinstance(getattr(module, "act_fn", None), silu) and _own_forward(module))


# ------------------------------------------------------------------------------------------------------- RoPE
# How many fused attention forwards this thread is inside: the patched function fuses only there.
_rotary_scope = threading.local()


def _rotary_depth() -> int:
    return getattr(_rotary_scope, "depth", 0)


def _rotary_wrapper(original: Callable) -> Callable:
    """original(q, k, cos, sin, ...) running the fused op inside a fused model's attention where it applies: HF's
    call with no options beyond unsqueeze_dim (and older transformers' unused position_ids=None)."""
    options = list(inspect.signature(original).parameters)[4:]

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _rotary_depth() > 0:
            given = dict(zip(options, args), **kwargs)
            unsqueeze_dim = given.pop("unsqueeze_dim", 1)
            if given.pop("position_ids", None) is None and not given and runs_fused(q, k, cos, sin, unsqueeze_dim):
                return apply_checked(q, k, cos, sin, unsqueeze_dim)       # functional.apply_rotary, checked once
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.ptlm_original = original
    return apply_rotary_pos_emb


def _patch_rotary(module_name: str) -> weakref.WeakSet:
    """The modeling module's function patched (once); the scopes holding the patch."""
    if module_name not in _ROTARY_PATCHES:
        modeling = importlib.import_module(module_name)
        original = getattr(modeling, ROTARY_FUNCTIONS[module_name])
        setattr(modeling, ROTARY_FUNCTIONS[module_name], _rotary_wrapper(original))
        _ROTARY_PATCHES[module_name] = (original, weakref.WeakSet())
    return _ROTARY_PATCHES[module_name][1]


def _holders(module_name: str) -> weakref.WeakSet | set:
    """The scopes holding the modeling module's patch (none: it is not patched)."""
    return _ROTARY_PATCHES.get(module_name, (None, set()))[1]


class _RotaryScope:
    """The forward pre-hook (enter) and hook (exit, run on exceptions too) of one fused attention module: the
    patched function fuses while this thread is inside. It holds the patch while it lives; a deep copy or an
    unpickled model gets scopes of its own, which hold it again."""

    def __init__(self, module_name: str):
        self.module_name = module_name
        _patch_rotary(module_name).add(self)

    def enter(self, module, args):
        _rotary_scope.depth = _rotary_depth() + 1

    def exit(self, module, args, output):
        _rotary_scope.depth = _rotary_depth() - 1

    def __reduce__(self):
        return type(self), (self.module_name,)


def _calls_rotary(module: nn.Module) -> bool:
    """An attention module of a table's modeling module whose forward calls the module-level RoPE function."""
    name = ROTARY_FUNCTIONS.get(type(module).__module__)
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return name is not None and code is not None and name in code.co_names


def _scope_hooks(module: nn.Module) -> list[tuple[int, _RotaryScope]]:
    """(hook id, scope) of the module's rotary-scope pre-hooks."""
    return [(hook_id, hook.__self__) for hook_id, hook in module._forward_pre_hooks.items()
            if isinstance(getattr(hook, "__self__", None), _RotaryScope)]


def _hold_rotary(model: nn.Module) -> None:
    for _, _, child in _modules(model):
        if _calls_rotary(child) and not _scope_hooks(child):
            scope = _RotaryScope(type(child).__module__)
            child.register_forward_pre_hook(scope.enter)
            child.register_forward_hook(scope.exit, always_call=True)


def _release_rotary(model: nn.Module) -> None:
    for child in {id(child): child for _, _, child in _every_module(model)}.values():
        for hook_id, scope in _scope_hooks(child):
            del child._forward_pre_hooks[hook_id]
            for exit_id, hook in list(child._forward_hooks.items()):
                if getattr(hook, "__self__", None) is scope:
                    del child._forward_hooks[exit_id]
                    child._forward_hooks_always_called.pop(exit_id, None)
            _holders(scope.module_name).discard(scope)
    for module_name, (original, holders) in list(_ROTARY_PATCHES.items()):
        if len(holders) == 0:
            modeling = importlib.import_module(module_name)
            current = getattr(modeling, ROTARY_FUNCTIONS[module_name])
            if getattr(current, "ptlm_original", None) is original:     # not re-patched by someone else since
                setattr(modeling, ROTARY_FUNCTIONS[module_name], original)
            del _ROTARY_PATCHES[module_name]


def _rotary_held(model: nn.Module) -> int:
    """The modeling modules whose patch the model's attention modules hold."""
    return len({scope.module_name for _, _, child in _modules(model) for _, scope in _scope_hooks(child)
                if scope in _holders(scope.module_name)})


# ------------------------------------------------------------------------------------------------------- loss
def _causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss


def _plain_head(head) -> bool:
    """An nn.Linear running nn.Linear's forward (not a subclass's: quantized or scaled heads) with no hooks: its
    weight and bias are all the logits are made of."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward \
        and not isinstance(head, AdapterLayer) and not hooked(head)


def _fusable_loss(model: nn.Module) -> bool:
    return (type(model).__name__ in CAUSAL_LM_CLASSES and isinstance(getattr(model, "model", None), nn.Module)
            and _plain_head(getattr(model, "lm_head", None)) and _own_forward(model))


def _loss_runs_fused(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """A training call whose loss fused gives transformers' loss (see the module docstring)."""
    if args or kwargs.get("labels") is None or not (model.training and torch.is_grad_enabled()):
        return False
    keep = kwargs.get("logits_to_keep", 0)
    return_dict = kwargs.get("return_dict")
    return ((isinstance(keep, int) and keep == 0)
            and (getattr(model.config, "return_dict", True) if return_dict is None else return_dict)
            and _plain_head(model.lm_head) and model.loss_function is _causal_lm_loss())


def _head_loss(hidden, head: nn.Linear, targets, ignore_index: int, num_items_in_batch):
    """transformers' cross_entropy(lm_head(hidden).float(), targets) (mean, or sum / num_items_in_batch), fused."""
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if not autocast_on(hidden) or torch.float64 in (hidden.dtype, weight.dtype):
        # autocast leaves float64 as it is
        return functional.linear_cross_entropy(hidden, weight, targets, ignore_index, "mean", bias, num_items_in_batch)
    dtype = torch.get_autocast_dtype(device_type)               # F.linear's autocast: the logits in this dtype
    with torch.autocast(device_type, enabled=False):
        return functional.linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, ignore_index, "mean",
                                               None if bias is None else bias.to(dtype), num_items_in_batch)


def _fused_loss_forward(self: nn.Module, labels, **kwargs):
    """The class forward of a causal LM with its loss fused and no logits (kwargs as the class forward's)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    outputs = self.model(**kwargs)           # as the class forward: every other keyword, the loss's ones included
    hidden = outputs.last_hidden_state                                                   # (B, L, d)
    ignore_index = kwargs.get("ignore_index", -100)
    targets = kwargs.get("shift_labels")
    if targets is None:  # ForCausalLMLoss: tokens < n predict n, the last position of each row predicts nothing
        targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    elif targets.numel() == hidden.shape[:-1].numel():   # ForCausalLMLoss takes them flat too (it views them)
        targets = targets.reshape(hidden.shape[:-1])
    loss = _head_loss(hidden, self.lm_head, targets.to(hidden.device), ignore_index,
                      kwargs.get("num_items_in_batch"))
    return CausalLMOutputWithPast(loss=loss, logits=None,
                                  **{k: v for k, v in outputs.items() if k != "last_hidden_state"})


class _LossForward:
    """A fused causal LM's instance-level forward: the fused loss where it applies, else the class forward.

    It holds the model weakly, so the model is in no reference cycle (a dropped model is freed at once, and stops
    holding the RoPE patch); copy.deepcopy and pickle rebuild it for the copy. Its __signature__ is the class
    forward's (for inspect: the Trainer's column filter, the prompt-tuning hook)."""

    def __init__(self, model: nn.Module, original: Callable):
        self._model = weakref.ref(model)
        self.ptlm_loss_original = original
        self.__signature__ = inspect.signature(types.MethodType(original, model))

    def __call__(self, *args, **kwargs):
        model = self._model()
        if _loss_runs_fused(model, args, kwargs):
            return _fused_loss_forward(model, **kwargs)
        return self.ptlm_loss_original(model, *args, **kwargs)

    def __reduce__(self):
        return type(self), (self._model(), self.ptlm_loss_original)


def _has_loss_forward(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), _LossForward)


# ------------------------------------------------------------------------------------------------- public API
def fuse_base_ops(model: nn.Module, loss: bool = True) -> dict[str, int]:
    """Switch the model's frozen base onto the fused ops, in place (see the module docstring for what and how).

    With loss, also the causal-LM training loss (a training call with labels returns logits=None). Idempotent
    (loss=False leaves a fused loss as it is); returns what now runs fused in the model: {"rms_norm": FusedRMSNorm
    modules, "gated_mlp": MLPs with the fused forward, "rotary": modeling modules whose apply_rotary_pos_emb the
    model holds patched, "loss": 1 where the model's forward fuses its loss, else 0}.
    Outputs and gradients are those of the original modules up to the kernels' rounding (half-precision forward
    outputs equal HF's but for rare last-bit differences of rstd / exp); where a fused op does not apply (no
    Triton for the tensor, another dtype) it runs its PyTorch reference, or HF's own function for RoPE.
    """
    _fuse_norms(model)
    silu = _silu_classes()
    for _, _, child in list(_modules(model)):
        if _fusable_mlp(child, silu):
            child.forward = _GatedMLPForward(child)
    _hold_rotary(model)
    if loss and _fusable_loss(model):
        model.forward = _LossForward(model, type(model).forward)
    return _counts(model)


def unfuse_base_ops(model: nn.Module) -> None:
    """Undo fuse_base_ops on the model: the original RMSNorm modules back in place (with their weights as they are
    now), the MLPs' and the model's class forward, and the RoPE functions once no other live fused model holds
    them."""
    if _has_loss_forward(model):
        del model.forward
    restored: dict[int, nn.Module] = {}              # a module under two parents comes back once
    for parent, name, child in list(_every_module(model)):   # modules_to_save copies made after fusing too
        if isinstance(child, FusedRMSNorm):
            module = restored.setdefault(id(child), child.restore())
            if name is None:
                parent.replace_original(module)
            else:
                parent._modules[name] = module
        elif _has_fused_forward(child):
            del child.forward
    _release_rotary(model)


def _counts(model: nn.Module) -> dict[str, int]:
    modules = {id(child): child for _, _, child in _modules(model)}.values()
    return {"rms_norm": sum(isinstance(m, FusedRMSNorm) for m in modules),
            "gated_mlp": sum(_has_fused_forward(m) for m in modules),
            "rotary": _rotary_held(model),
            "loss": int(_has_loss_forward(model))}
