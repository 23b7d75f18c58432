"""Adapter slots for mixed batches: model-wide slot ids, each layer's stacked pool, and the per-row mapping.

Every adapter name gets one slot id for the whole model (`free_slot`), the same in every layer, so one per-token
index tensor serves every layer. Each LoraLinear and BottleneckLayer keeps an AdapterPool: copies of its adapters'
tensors stacked in the layout (LoraSlots, BottleneckSlots) that one multi-adapter kernel launch reads whole. An
AdapterBatch is the per-row mapping that `pe.adapter_batch` hands to every layer.
"""
from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from ptlm_engine import functional
from ptlm_engine.ops.lora import triton_enabled


def free_slot(taken: Iterable[int]) -> int:
    """The lowest slot id not in `taken`: a removed adapter's slot is reused before the pools grow."""
    taken = set(taken)
    return next(slot for slot in range(len(taken) + 1) if slot not in taken)


# Fused optimizers (torch's fused=True AdamW / Adam / SGD, HF Trainer's default adamw_torch_fused, kernels of
# other libraries) write Parameters without bumping their version counters. So every step of any torch.optim
# optimizer counts as a write to every Parameter: stamps hold the number of such writes in this process.
_parameter_writes = 0


def note_parameter_writes() -> None:
    """Count a write to Parameters that their version counters do not show (a fused optimizer step, a CUDA graph
    replaying one): every stamp taken before it is stale."""
    global _parameter_writes
    _parameter_writes += 1


register_optimizer_step_post_hook(lambda optimizer, args, kwargs: note_parameter_writes())


def stamp(params: Sequence[Tensor]) -> tuple:
    """What identifies the values of Parameters, for caches of what they compute: the objects, their storage,
    their version counters (which in-place writes bump: copy_ under no_grad, load_state_dict, foreach and
    for-loop optimizer steps) and the writes counted above (optimizer steps, replays). Weakrefs, so that a
    replaced Parameter is not kept alive by a cache. Writes through `.data` bump nothing and are not seen."""
    return _parameter_writes, tuple((weakref.ref(p), p.data_ptr(), p._version) for p in params)


def unchanged(kept: tuple | None, params: Sequence[Tensor]) -> bool:
    """Whether `params` still have the values `kept` (a stamp of them) identified."""
    if kept is None or kept[0] != _parameter_writes or len(kept[1]) != len(params):
        return False
    # Item by item: weakrefs compare their referents with ==, which for tensors is elementwise.
    return all(ref() is p and ptr == p.data_ptr() and version == p._version
               for (ref, ptr, version), p in zip(kept[1], params))


def _capturing() -> bool:
    """Whether a CUDA graph is being captured (its replays run the kernels on whatever the tensors hold then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-slot floats (scales, ...) for tensors of `dtype`: float32, which the kernels read, or
    float64 on a float64 model (the reference path), so that a scale such as 1/3 is the layer's own."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(kind: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return scalar_dtype(dtype) if kind == torch.float32 else kind


class AdapterPool:
    """One layer's adapters stacked where one kernel launch reaches all of them: a cache of their Parameters.

    `stacked` names the per-adapter tensors and gives each one's per-slot shape, with None at the width dim (the
    LoRA rank, the bottleneck width), which the pool pads to the widest adapter's: a LoRA pool stacks lora_A
    (None, d_in) and lora_B (d_out, None) into (S, r_max, d_in) and (S, d_out, r_max). `scalars` names the
    per-slot numbers and their dtypes, the first being the width (ranks (S,) int32, scales (S,) float32, ...).
    All live on one device; the stacked tensors in one (compute) dtype. They are the pool's attributes
    (`pool.lora_A`, `pool.ranks`), and `slots` hands the op its fields of them as `slots_type` (LoraSlots,
    BottleneckSlots). Slot s holds the adapter with model-wide slot id s, zeros beyond its width (allocations
    are zero and `clear` zeroes a whole slot, so a write never needs to clear the rest); an empty or freed slot
    is all zeros, every scalar 0.

    The Parameters stay the truth (optimizers update them, state dicts hold them); `sync` copies an adapter in
    again only when its stamp changed. Capacity S doubles when a slot id beyond it arrives and the padded width
    grows only when a wider adapter does, so adding an adapter copies the others only at those growths.

    Its tensors are allocated outside inference mode even under torch.inference_mode (as is every tensor kept
    here across calls): an inference tensor could not be written in place, nor saved for backward, later.
    """

    def __init__(self, slots_type: type, stacked: dict[str, tuple[int | None, ...]],
                 scalars: dict[str, torch.dtype], device: torch.device, dtype: torch.dtype):
        self.slots_type = slots_type
        self.stacked = stacked
        self.scalars = scalars
        # Per stacked tensor: the dim of the stacked (S, ...) tensor that is the width, None where it has none.
        self._width_dims = {name: shape.index(None) + 1 if None in shape else None for name, shape in stacked.items()}
        # The first stacked tensor with a width: its position among an adapter's tensors, its name.
        self._width_at, self._width_of = next((i, name) for i, (name, dim) in enumerate(self._width_dims.items())
                                              if dim is not None)
        with torch.inference_mode(False):
            for name, shape in stacked.items():
                setattr(self, name, torch.zeros(0, *(0 if n is None else n for n in shape), device=device,
                                                dtype=dtype))
            for name, kind in scalars.items():     # a float32 kind follows the pool's dtype (scalar_dtype)
                setattr(self, name, torch.zeros(0, device=device, dtype=_scalar(kind, dtype)))
        self._stamps: list[tuple | None] = []        # per slot: the stamp of the Parameters last copied in
        self._batch_stamp: tuple | None = None       # sync_batch's one stamp of a whole batch's Parameters
        self._views: dict = {}                       # count -> slots(count), until the tensors are reallocated
        self._put: dict[int, dict[str, float]] = {}  # per slot: the scalars put (move writes them again, exact)

    @property
    def capacity(self) -> int:
        return len(self._stamps)

    @property
    def width(self) -> int:
        """The padded width: the widest adapter's (r_max, m_max)."""
        name = self._width_of
        return getattr(self, name).shape[self._width_dims[name]]

    @property
    def device(self) -> torch.device:
        return getattr(self, self._width_of).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._width_of).dtype

    def slots(self, count: int | None = None):
        """The first `count` slots (all by default) as `slots_type`, from the pool's tensors of its fields:
        views, no copy, made once until the tensors are reallocated."""
        views = self._views.get(count)
        if views is None:
            with torch.inference_mode(False):   # kept across calls
                views = self.slots_type(*(getattr(self, field)[:count] for field in self.slots_type._fields
                                          if field in self.stacked or field in self.scalars))
            self._views[count] = views
        return views

    @torch.inference_mode(False)
    @torch.no_grad()
    def reserve(self, slot: int, width: int = 0) -> None:
        """Room for slot id `slot` with width `width`: the capacity doubles until it holds the slot, the padded
        width rises to `width`; the stored slots are copied over only when either grows."""
        old_capacity, old_width = self.capacity, self.width
        capacity = max(old_capacity, 1)
        while capacity <= slot:
            capacity *= 2
        width = max(old_width, width)
        if (capacity, width) == (old_capacity, old_width):
            return
        for name, dim in self._width_dims.items():
            old = getattr(self, name)
            shape = [capacity, *old.shape[1:]]
            if dim is not None:
                shape[dim] = width
            new = old.new_zeros(shape)
            new[tuple(slice(None, n) for n in old.shape)] = old
            setattr(self, name, new)
        grow = capacity - old_capacity
        for name in self.scalars:
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, old.new_zeros(grow)]))
        self._stamps += [None] * grow
        self._views = {}

    @torch.no_grad()
    def put(self, slot: int, params: Sequence[Tensor], **scalars: float) -> None:
        """Store an adapter's tensors, in `stacked`'s order, and its scalars but the width (taken from its
        tensors) by name, in `slot`, a free one. Trailing tensors may be left out (an adapter without a part the
        others may have): their slot stays zero."""
        width = params[self._width_at].shape[self._width_dims[self._width_of] - 1]
        self.reserve(slot, width)
        getattr(self, next(iter(self.scalars)))[slot] = width
        for name, value in scalars.items():
            getattr(self, name)[slot] = value
        self._put[slot] = {next(iter(self.scalars)): width, **scalars}
        self._write(slot, params)
        self._batch_stamp = None

    def sync(self, slot: int, params: Sequence[Tensor]) -> None:
        """Copy the adapter in `slot` again if its Parameters changed since the last copy."""
        if not unchanged(self._stamps[slot], params):
            self._write(slot, params)

    def sync_batch(self, params: Callable[[], list[Tensor]], adapters: dict[int, str],
                   parameters: Callable[[str], Sequence[Tensor]], frozen: object | None = None) -> None:
        """`sync` every adapter of a mixed batch, on the serving path of every layer at every step: one flat
        stamp of `params()`, all their Parameters (the objects, their storage and version counters, and the writes
        counted), decides whether any slot needs its own check; only then each adapter (slot -> name in `adapters`)
        is synced with its `parameters(name)`. With 32 LoRA adapters, ~30 us per layer call on the dev CPU against
        140-180 us for the per-slot checks. `frozen`: AdapterBatch.frozen, a token while the Parameters cannot
        change; under the token of the last check nothing is checked again (the stamp, which keeps the token, is
        dropped whenever the pool's contents change)."""
        kept = self._batch_stamp
        if frozen is not None and kept is not None and kept[2] is frozen:
            return
        self._check_batch(params(), adapters, parameters, frozen)

    def _check_batch(self, params: list[Tensor], adapters: dict[int, str],
                     parameters: Callable[[str], Sequence[Tensor]], frozen: object | None) -> None:
        state = (_parameter_writes, *(p._version for p in params), *(p.data_ptr() for p in params))
        kept = self._batch_stamp                 # holds the Parameters themselves, so `is` compares live objects
        if kept is None or kept[1] != state or not all(map(operator.is_, params, kept[0])):
            for slot, name in adapters.items():
                self.sync(slot, parameters(name))
        self._batch_stamp = (params, state, frozen)

    @torch.no_grad()
    def _write(self, slot: int, params: Sequence[Tensor]) -> None:
        for (name, dim), param in zip(self._width_dims.items(), params):
            stacked = getattr(self, name)
            if dim is None:
                stacked[slot] = param
            else:                                  # the adapter's own width, the rest of the slot stays zero
                stacked[(slot, *[slice(None)] * (dim - 1), slice(None, param.shape[dim - 1]))] = param
        self._stamps[slot] = stamp(params)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Free `slot` for reuse: zero tensors and scalars."""
        for name in self.stacked:
            getattr(self, name)[slot].zero_()
        for name in self.scalars:
            getattr(self, name)[slot] = 0
        self._put.pop(slot, None)
        self._stamps[slot] = None
        self._batch_stamp = None

    def __getstate__(self) -> dict:
        # Weakrefs do not pickle; a copied or unpickled pool copies each adapter in again at its next sync.
        return {**self.__dict__, "_stamps": [None] * self.capacity, "_batch_stamp": None, "_views": {}}

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """`move` where the layer's device or compute dtype is not the pool's."""
        if self.device != device or self.dtype != dtype:
            self.move(device, dtype)

    @torch.inference_mode(False)
    def move(self, device: torch.device, dtype: torch.dtype) -> None:
        """Reallocate on `device` in `dtype` (the layer moved, or the compute dtype changed under autocast): the
        same capacity and scalars; every tensor is copied in again by the next `sync` of its slot. Nothing is
        copied from the old tensors, which may be on the meta device (a model built empty, then `to_empty`)."""
        for name in self.stacked:
            setattr(self, name, torch.zeros(getattr(self, name).shape, device=device, dtype=dtype))
        for name, kind in self.scalars.items():
            setattr(self, name, torch.zeros(self.capacity, device=device, dtype=_scalar(kind, dtype)))
        for slot, values in self._put.items():      # again from the numbers put: float32 -> float64 stays exact
            for name, value in values.items():
                getattr(self, name)[slot] = value
        self._stamps = [None] * self.capacity
        self._batch_stamp = None
        self._views = {}


@torch.inference_mode(False)   # kept across calls
def slot_values(here: Sequence[str | None], values: dict[str, float], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """(len(here),) values[name] for each slot's adapter name in a layer's mixed batch, 0 where the layer lacks
    the slot's adapter (None): the per-slot numbers a layer builds once per batch (see AdapterBatch.layer_slots)."""
    return torch.tensor([0 if name is None else values[name] for name in here], dtype=dtype, device=device)


def _tensors(values: Iterable, depth: int = 2) -> Iterable[Tensor]:
    """The tensors among `values` and, `depth` levels down, in their mappings, lists and tuples (a batch dict
    passed as the model's one argument)."""
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif depth and isinstance(value, Mapping):
            yield from _tensors(value.values(), depth - 1)
        elif depth and isinstance(value, (list, tuple)):
            yield from _tensors(value, depth - 1)


class AdapterBatch:
    """A mixed batch's mapping: one adapter name (None: the base model) per row.

    Keeps the per-row slot ids (-1 for None) as an int32 tensor on each device the layers use, built once, and
    expands it the way `generate` expands the batch: beam search and num_return_sequences repeat each row in
    place (row i becomes rows i·k … i·k+k-1). Outside `generate` (while `expanding` is False) the batch must
    have exactly one row per entry. Every layer of one forward pass gets the same token index and token
    grouping from `tokens`, built by the first layer.
    """

    def __init__(self, names: Sequence[str | None], slot_of: dict[str, int], devices: Iterable[torch.device]):
        self.names = list(names)
        self.slot_ids = [-1 if name is None else slot_of[name] for name in self.names]
        self._live_slots = set(self.slot_ids)
        self.adapters = {name: slot_of[name] for name in dict.fromkeys(self.names) if name is not None}
        # The slot ids this batch indexes are 0 … num_slots-1: every layer passes that many slots to the op.
        self.num_slots = max(self.slot_ids) + 1
        self._rows = {device: self._row_tensor(device) for device in devices}
        # (device, token shape) -> (index, segments): one entry per input shape seen (a prefill and a decode step
        # in generate), kept for the block's lifetime so a CUDA graph captured on one stays valid while the
        # other runs eagerly.
        self._tokens: dict[tuple, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
        # Copies of those for forwards that record a graph (eager training): autograd saves them for a backward
        # that may run after a remap rewrote the kept ones in place; dropped at each remap.
        self._snapshots: dict[tuple, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
        self.expanding = False
        # Tokens per row (per name: a row generate repeats k times counts k rows' tokens) that the forward pass in
        # progress shows: its model call's tensor inputs (see before_forward) and its layers' inputs of 3+ dims. A
        # 2-D layer input of rows·k tokens is read as each row's k tokens one after another only for such a k.
        self._per_row: set[int] = set()
        # Whether a layer ran with the batch, and whether one did with gradients enabled (a training block).
        self.used = self.trained = False
        # A token while the adapters' Parameters cannot change (each model.generate call; a static block's whole
        # lifetime), None otherwise: a layer checks its pool against the Parameters once per token
        # (AdapterPool.sync_batch touched 64 Parameters per layer call with 32 adapters: 15 of a 42 ms decode
        # step's host time on the dev CPU, 16 layers).
        self.frozen: object | None = None

    @torch.inference_mode(False)   # kept across calls: see AdapterPool
    def _row_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor(self.slot_ids, dtype=torch.int32, device=device)

    def layer_slots(self, names: Container[str]) -> tuple[dict[int, str], list[str | None]]:
        """A layer's share of the batch, for the layer holding adapters `names`: slot id -> name of the batch's
        adapters it has, and for each slot 0 … num_slots-1 that name, or None where the layer lacks it."""
        adapters = {slot: name for name, slot in self.adapters.items() if name in names}
        return adapters, [adapters.get(slot) for slot in range(self.num_slots)]

    def check_rows(self, n: int, shape: tuple | None = None) -> None:
        """ValueError unless a batch of n rows (an input of `shape`, for the message) fits the mapping: n rows,
        or inside generate a multiple of them. Layers that keep per-row layouts per batch size check every
        call, since whether a size fits depends on `expanding`."""
        self._note_call()
        rows = len(self.names)
        if not self._fits(n):
            got = f"input of shape {shape}" if shape is not None else f"a batch of {n}"
            must = "a multiple of" if self.expanding else "equal to"
            raise ValueError(f"adapter_batch maps {rows} rows, but a layer got {got}: its batch size (dim 0) must "
                             f"be {must} the number of names")

    def before_forward(self, model, args: tuple, kwargs: dict) -> None:
        """A forward pass of the model starts (pe.adapter_batch's forward pre-hook on the model): its tensor
        inputs whose dim 0 is the batch (`check_rows`'s rule) give the tokens per row a flattened layer input may
        hold: all dims after 0 of an integer or bool tensor (token ids, attention masks), all but the last
        feature dim of a floating one (embeddings)."""
        if torch.compiler.is_compiling():
            return
        self._per_row = set()
        rows = len(self.names)
        for value in _tensors((*args, *kwargs.values())):
            if value.dim() >= 2 and self._fits(value.shape[0]):
                features = value.is_floating_point() or value.is_complex()
                self._per_row.add(value.shape[0] // rows * math.prod(value.shape[1:-1 if features else None]))

    def after_forward(self, model, args: tuple, output) -> None:
        """The forward pass ended (pe.adapter_batch's forward hook on the model, also on an error)."""
        if not torch.compiler.is_compiling():
            self._per_row = set()

    def _fits(self, n: int) -> bool:
        rows = len(self.names)
        return n == rows or (self.expanding and n > 0 and n % rows == 0)

    def row_slots(self, n: int) -> list[int]:
        """The slot id (-1: none) of each of n rows, on the host; ValueError if n does not fit the mapping."""
        self.check_rows(n)
        return [s for s in self.slot_ids for _ in range(n // len(self.names))]

    def _note_call(self) -> None:
        """A layer runs with the batch (with gradients enabled: the block trains)."""
        self.used = True
        self.trained = self.trained or torch.is_grad_enabled()

    def has_rows(self, slot: int) -> bool:
        """Whether the adapter in `slot` gets a gradient from this forward: it has rows now, or the forward is
        traced or captured (a remap may give it rows when the graph replays)."""
        if slot in self._live_slots:
            return True
        return torch.compiler.is_compiling() or _capturing()

    def remap(self, names: Sequence[str | None]) -> None:
        """Row i runs names[i] from now on: as many rows as before, each adapter one of the batch's (or None).
        The per-device row tensors and every kept token index and grouping are rewritten in place, so whatever
        holds them (a CUDA graph captured in the block) sees the new mapping; num_slots stays."""
        slot_ids = [-1 if name is None else self.adapters[name] for name in names]
        self.names, self.slot_ids, self._live_slots = list(names), slot_ids, set(slot_ids)
        self._snapshots = {}
        with torch.inference_mode(False), torch.no_grad():
            for rows in self._rows.values():
                rows.copy_(torch.tensor(slot_ids, dtype=torch.int32))
            for (device, shape), (index, segments) in self._tokens.items():
                index.copy_(self._token_index(device, shape))
                if segments is not None:
                    for kept, new in zip(segments, functional.token_segments(index, self.num_slots)):
                        kept.copy_(new)

    def _token_index(self, device: torch.device, shape: torch.Size) -> Tensor:
        """Each token's slot id (shape, int32) for tokens of `shape` (batch first, its size checked by check_rows),
        from the row tensor on `device` (made there if the model moved inside the block), a row repeated in
        place as `generate` repeats it."""
        rows = self._rows.get(device)                                               # (rows,)
        if rows is None:
            rows = self._rows[device] = self._row_tensor(device)
        if shape[0] != len(self.names):
            rows = rows.repeat_interleave(shape[0] // len(self.names))              # (N,)
        return rows.view(-1, *[1] * (len(shape) - 1)).expand(shape)

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """For x (..., d_in): (index, segments). index (...) int32 is each token's slot id (its row's; a 2-D x
        of rows·k tokens holds each row's k tokens one after another, for a k the forward shows: see _per_row);
        segments are the tokens grouped by slot (functional.token_segments over num_slots), which the Triton
        kernels need: made once here for all layers rather than sorted again in each one (None where the
        reference runs, which does not group tokens). Both are kept per input shape for the block's lifetime;
        ValueError if x's batch size does not fit the mapping."""
        shape = x.shape[:-1]
        n = x.shape[0] if x.dim() >= 2 else 0
        self._note_call()
        rows = len(self.names)
        # A 2-D x of k tokens per row is a (rows, k, d) batch flattened row-major (OPT's decoder layer feeds fc1
        # and fc2 so): row i owns tokens i·k … i·k+k-1, which is how _token_index repeats a row.
        flat = x.dim() == 2 and n != rows and n > 0 and n % rows == 0
        if not flat:
            self.check_rows(n, tuple(x.shape))                              # also on a hit (see check_rows)
        if torch.compiler.is_compiling():   # a traced graph computes them rather than caching traced tensors
            return self._token_index(x.device, shape), None
        if flat and rows > 1 and n // rows not in self._per_row:
            # Nothing shows k tokens per row: the rows may be stacked along dim 0 instead (torch.cat([x, x2]),
            # two views of one batch), which the row-major reading would give other rows' adapters.
            seen = f"{sorted(self._per_row)} tokens per row" if self._per_row else "no tokens per row"
            raise ValueError(f"adapter_batch maps {rows} rows, but a layer got input of shape {tuple(x.shape)}, "
                             f"read as the rows' {n // rows} tokens each flattened one after another, while the "
                             f"model's inputs and earlier layers show {seen}: its batch size (dim 0) must be equal "
                             "to the number of names, or its rows' tokens flattened (B·L, d); rows stacked along "
                             "dim 0 (torch.cat of two views) would get other rows' adapters")
        if x.dim() >= 3:
            self._per_row.add(n // rows * math.prod(shape[1:]))
        key = (x.device, shape)
        if key not in self._tokens:
            with torch.inference_mode(False):                                       # kept across calls
                index = self._token_index(x.device, shape).clone()
                segments = functional.token_segments(index, self.num_slots) if triton_enabled(x) else None
            self._tokens[key] = (index, segments)
        if not torch.is_grad_enabled() or _capturing():
            return self._tokens[key]       # a captured step's backward replays with its forward: the kept ones
        if key not in self._snapshots:     # a pending backward keeps its forward's mapping across a remap
            index, segments = self._tokens[key]
            with torch.inference_mode(False), torch.no_grad():
                self._snapshots[key] = (index.clone(), None if segments is None else tuple(t.clone() for t in segments))
        return self._snapshots[key]
