"""Adapter slots for mixed batches: model-wide slot ids, each layer's stacked pool, and the per-row mapping.

Every adapter name gets one slot id for the whole model (`free_slot`), the same in every layer, so one per-token
index tensor serves every layer. Each LoraLinear keeps an AdapterPool: copies of its adapters' A and B stacked in
the LoraSlots layout, which one multi-adapter kernel launch reads whole. An AdapterBatch is the per-row mapping
that `pe.adapter_batch` hands to every layer.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ptlm_engine import functional
from ptlm_engine.ops.lora import triton_enabled
from ptlm_engine.ops.lora_multi import LoraSlots


def free_slot(taken: Iterable[int]) -> int:
    """The lowest slot id not in `taken`: a removed adapter's slot is reused before the pools grow."""
    taken = set(taken)
    return next(slot for slot in range(len(taken) + 1) if slot not in taken)


def _stamp(lora_A: Tensor, lora_B: Tensor) -> tuple:
    """What identifies the values of an adapter's Parameters: the objects, their storage and their version
    counters (which every in-place write bumps: optimizer steps, copy_, load_state_dict)."""
    return tuple(item for p in (lora_A, lora_B) for item in (weakref.ref(p), p.data_ptr(), p._version))


def _same(stamp: tuple | None, lora_A: Tensor, lora_B: Tensor) -> bool:
    # Compared item by item: weakrefs compare their referents with ==, which for tensors is elementwise.
    if stamp is None:
        return False
    ref_A, ptr_A, ver_A, ref_B, ptr_B, ver_B = stamp
    return (ref_A() is lora_A and ref_B() is lora_B and ptr_A == lora_A.data_ptr() and ptr_B == lora_B.data_ptr()
            and ver_A == lora_A._version and ver_B == lora_B._version)


class AdapterPool:
    """One layer's adapters stacked where one kernel launch reaches all of them: a cache of their Parameters.

    lora_A (S, r_max, d_in), lora_B (S, d_out, r_max), ranks (S,) int32, scales (S,) float32, on one device, in
    one (compute) dtype; slot s holds the adapter with model-wide slot id s in its first ranks[s] rows / columns,
    zeros beyond (allocations are zero and `clear` zeroes a whole slot, so a write of rank r never needs to
    clear the rest). An empty or freed slot has rank 0 and scale 0.

    The Parameters stay the truth (optimizers update them, state dicts hold them); `sync` copies an adapter in
    again only when its stamp changed. Capacity S doubles when a slot id beyond it arrives and r_max grows only
    when a larger rank does, so adding an adapter copies the others only at those growths.

    Its tensors are allocated outside inference mode even under torch.inference_mode (as is every tensor kept
    here across calls): an inference tensor could not be written in place, nor saved for backward, later.
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype):
        self.d_in, self.d_out = d_in, d_out
        self.lora_A = torch.zeros(0, 0, d_in, device=device, dtype=dtype)
        self.lora_B = torch.zeros(0, d_out, 0, device=device, dtype=dtype)
        self.ranks = torch.zeros(0, device=device, dtype=torch.int32)
        self.scales = torch.zeros(0, device=device, dtype=torch.float32)
        self._stamps: list[tuple | None] = []        # per slot: the stamp of the Parameters last copied in

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    @property
    def r_max(self) -> int:
        return self.lora_A.shape[1]

    @property
    def device(self) -> torch.device:
        return self.lora_A.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def slots(self, count: int | None = None) -> LoraSlots:
        """The first `count` slots (all by default): views, no copy."""
        return LoraSlots(self.lora_A[:count], self.lora_B[:count], self.ranks[:count], self.scales[:count])

    @torch.inference_mode(False)
    @torch.no_grad()
    def reserve(self, slot: int, rank: int = 0) -> None:
        """Room for slot id `slot` with rank `rank`: the capacity doubles until it holds the slot, r_max rises to
        the rank; the stored slots are copied over only when either grows."""
        old_capacity, old_r = self.capacity, self.r_max
        capacity = max(old_capacity, 1)
        while capacity <= slot:
            capacity *= 2
        r_max = max(old_r, rank)
        if (capacity, r_max) == (old_capacity, old_r):
            return
        lora_A = self.lora_A.new_zeros(capacity, r_max, self.d_in)
        lora_B = self.lora_B.new_zeros(capacity, self.d_out, r_max)
        lora_A[:old_capacity, :old_r] = self.lora_A
        lora_B[:old_capacity, :, :old_r] = self.lora_B
        self.lora_A, self.lora_B = lora_A, lora_B
        grow = capacity - old_capacity
        self.ranks = torch.cat([self.ranks, self.ranks.new_zeros(grow)])
        self.scales = torch.cat([self.scales, self.scales.new_zeros(grow)])
        self._stamps += [None] * grow

    @torch.no_grad()
    def put(self, slot: int, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
        """Store an adapter (A (r, d_in), B (d_out, r)) in `slot`, a free one."""
        rank = lora_A.shape[0]
        self.reserve(slot, rank)
        self.ranks[slot], self.scales[slot] = rank, scale
        self._write(slot, lora_A, lora_B)

    def sync(self, slot: int, lora_A: Tensor, lora_B: Tensor) -> None:
        """Copy the adapter in `slot` again if its Parameters changed since the last copy."""
        if not _same(self._stamps[slot], lora_A, lora_B):
            self._write(slot, lora_A, lora_B)

    @torch.no_grad()
    def _write(self, slot: int, lora_A: Tensor, lora_B: Tensor) -> None:
        rank = lora_A.shape[0]
        self.lora_A[slot, :rank] = lora_A                                          # (r, d_in)
        self.lora_B[slot, :, :rank] = lora_B                                       # (d_out, r)
        self._stamps[slot] = _stamp(lora_A, lora_B)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Free `slot` for reuse: zero weights, rank 0, scale 0."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.ranks[slot], self.scales[slot] = 0, 0.0
        self._stamps[slot] = None

    def __getstate__(self) -> dict:
        # Weakrefs do not pickle; a copied or unpickled pool copies each adapter in again at its next sync.
        return {**self.__dict__, "_stamps": [None] * self.capacity}

    @torch.inference_mode(False)
    def move(self, device: torch.device, dtype: torch.dtype) -> None:
        """Reallocate on `device` in `dtype` (the layer moved, or the compute dtype changed under autocast): the
        same capacity, ranks and scales; every weight is copied in again by the next `sync` of its slot."""
        self.lora_A = torch.zeros(self.lora_A.shape, device=device, dtype=dtype)
        self.lora_B = torch.zeros(self.lora_B.shape, device=device, dtype=dtype)
        self.ranks, self.scales = self.ranks.to(device), self.scales.to(device)
        self._stamps = [None] * self.capacity


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
        self.adapters = {name: slot_of[name] for name in dict.fromkeys(self.names) if name is not None}
        # The slot ids this batch indexes are 0 … num_slots-1: every layer passes that many slots to the op.
        self.num_slots = max(self.slot_ids) + 1
        self._rows = {device: self._row_tensor(device) for device in devices}
        # (device, token shape) -> (index, segments): one entry per input shape seen (a prefill and a decode step
        # in generate), kept for the block's lifetime so a CUDA graph captured on one stays valid while the
        # other runs eagerly.
        self._tokens: dict[tuple, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
        self.expanding = False

    @torch.inference_mode(False)   # kept across calls: see AdapterPool
    def _row_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor(self.slot_ids, dtype=torch.int32, device=device)

    def _check(self, x: Tensor) -> None:
        rows, n = len(self.names), x.shape[0] if x.dim() >= 2 else 0
        if n != rows and not (self.expanding and n > 0 and n % rows == 0):
            shape = "a multiple of" if self.expanding else "equal to"
            raise ValueError(f"adapter_batch maps {rows} rows, but a layer got input of shape {tuple(x.shape)}: "
                             f"its batch size (dim 0) must be {shape} the number of names")

    def row_slots(self, n: int) -> list[int]:
        """The slot id (-1: none) of each of n rows, on the host; ValueError if n does not fit the mapping."""
        rows = len(self.names)
        if n != rows and not (self.expanding and n > 0 and n % rows == 0):
            shape = "a multiple of" if self.expanding else "equal to"
            raise ValueError(f"adapter_batch maps {rows} rows, but a layer got a batch of {n}: its batch size "
                             f"(dim 0) must be {shape} the number of names")
        return [s for s in self.slot_ids for _ in range(n // rows)]

    def row_index(self, x: Tensor) -> Tensor:
        """(N,) slot id of each row of x (batch-first, N = x.shape[0]); ValueError if N does not fit."""
        self._check(x)
        index = self._rows.get(x.device)                                            # (rows,)
        if index is None:                   # the model moved to another device inside the block
            index = self._rows[x.device] = self._row_tensor(x.device)
        n, rows = x.shape[0], len(self.names)
        return index if n == rows else index.repeat_interleave(n // rows)           # (N,)

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """For x (..., d_in): (index, segments). index (...) int32 is each token's slot id (its row's);
        segments are the tokens grouped by slot (functional.token_segments over num_slots), which the Triton
        kernels need: made once here for all layers rather than sorted again in each one (None where the
        reference runs, which does not group tokens). Both are kept per input shape for the block's lifetime;
        ValueError if x's batch size does not fit the mapping."""
        shape = x.shape[:-1]
        if torch.compiler.is_compiling():   # a traced graph computes them rather than caching traced tensors
            return self.row_index(x).view(-1, *[1] * (len(shape) - 1)).expand(shape), None
        self._check(x)                      # also on a hit: whether a shape is allowed depends on `expanding`
        key = (x.device, shape)
        if key not in self._tokens:
            with torch.inference_mode(False):                                       # kept across calls
                index = self.row_index(x).view(-1, *[1] * (len(shape) - 1)).expand(shape).clone()
                segments = functional.token_segments(index, self.num_slots) if triton_enabled(x) else None
            self._tokens[key] = (index, segments)
        return self._tokens[key]
