"""Arrival counters and partials workspace for kernels that split one output across programs and let the last
program to finish sum the partials (the split-K decode GEMMs, the bottleneck gradient chunks): no memset launch
before them and no reduction launch after them.

Also the counters a program waits on (wait_count / count_in): the decode kernels' shrink programs count their
xa in, and the matmul programs of the same launch wait for it.

Per (device, stream) one int32 counter buffer, zero between launches (each launch's last programs zero theirs
again), and one fp32 workspace, grown as needed and never freed: a CUDA graph that captured a launch keeps
pointing at them. Launches on one stream run in turn, so kernels share them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import next_pow2

# Reads of a counter a program waits on before it gives up (wait_count): ~1 s on an H100, far past any wait
# the kernels mean (a shrink beside a matmul).
MAX_SPINS = tl.constexpr(1 << 20)

_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []


def split_state(device: torch.device, counters: int, workspace: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counters int32 >= counters, workspace fp32 >= workspace) for the current stream of `device`."""
    key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    state = _BUFFERS.get(key)
    if state is None or state[0].numel() < counters or state[1].numel() < workspace:
        if state is not None:
            _OUTGROWN.append(state)
        old_c, old_w = (0, 0) if state is None else (state[0].numel(), state[1].numel())
        state = (torch.zeros(max(1024, next_pow2(counters), old_c), device=device, dtype=torch.int32),
                 torch.empty(max(1 << 16, next_pow2(workspace), old_w), device=device, dtype=torch.float32))
        _BUFFERS[key] = state
    return state


@triton.jit
def arrive_last(count_ptr, index, total):
    """After the calling program's partial stores: True for the last of `total` programs to arrive at counter
    `index`; that program sees every other program's stores (read them with cache_modifier=".cg") and must zero
    the counter (tl.atomic_xchg(count_ptr + index, 0)) for the next launch."""
    tl.debug_barrier()                 # every thread's partial is written before the count goes up
    return tl.atomic_add(count_ptr + index, 1, sem="acq_rel") == total - 1


@triton.jit
def wait_count(ptr, total):
    """Spin until the int32 counter at ptr reaches `total`, then what the programs that counted in stored before
    (count_in) is visible to every thread of this one: the spinning read acquires, a CTA barrier follows. At
    most MAX_SPINS reads: a counter that never fills gives wrong sums, not a hung GPU."""
    seen = tl.atomic_add(ptr, 0, sem="acquire")
    spins = 0
    while (seen < total) & (spins < MAX_SPINS):
        seen = tl.atomic_add(ptr, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()


@triton.jit
def count_in(ptr):
    """Add this program to the counter at ptr once every thread's stores are issued (release)."""
    tl.debug_barrier()
    tl.atomic_add(ptr, 1, sem="release")
