"""The LoRA-embedding forward kernel against a float64 reference: mixed ranks, rows without an adapter, odd
shapes, strided slots, an output scale, token ids outside the table, poisoned outputs.

On the CPU these run under TRITON_INTERPRET=1 (bf16 is skipped there)."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import token_segments
from ptlm_engine.kernels import lora_embedding as K
from tests.helpers import DEVICE, DTYPES, assert_matches, lora_slots64, needs_triton

pytestmark = needs_triton


def _launch(ids, weight, a, b, index, ranks, scales, embed_scale=1.0, width=16):
    T, d = ids.shape[0], weight.shape[1]
    y = torch.full((T, d), float("nan"), device=DEVICE, dtype=weight.dtype)       # poisoned: every element written
    order, _ = token_segments(index.to(torch.int32), a.shape[0])
    _, xa = K.lora_embedding_forward(ids, weight, a, b, index, order, ranks, scales, embed_scale, width, out=y)
    return y, xa


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,V,d,ranks,programs", [(1, 7, 5, [3], 512), (19, 37, 45, [8, 3, 1], 512),
                                                  (40, 101, 300, [16, 5], 512), (70, 53, 300, [40, 3, 24, 1], 1)])
def test_forward_matches_float64(T, V, d, ranks, programs, dtype, monkeypatch):
    """programs=1: each program walks every column tile (as with many token blocks on a GPU); ranks up to 40:
    a 64-wide rank tile, several runs of slots per block of sorted tokens."""
    monkeypatch.setattr(K, "PROGRAMS", programs)
    torch.manual_seed(T + V + d)
    a64, b64, ranks_t, scales = lora_slots64(len(ranks), V, d, ranks)
    w64 = torch.randn(V, d, dtype=torch.float64)
    ids = torch.randint(0, V, (T,), device=DEVICE)
    index = torch.randint(-1, len(ranks), (T,), device=DEVICE)
    to = lambda t: t.to(DEVICE, dtype)
    width = 16 * -(-max(ranks) // 16)                         # xa's width: r_max rounded up to a multiple of 16
    y, xa = _launch(ids, to(w64), to(a64), to(b64), index, ranks_t, scales, 1.7, width=width)
    lowp = [to(t).to(torch.float64) for t in (w64, a64, b64)]          # the inputs as the kernel reads them
    y64 = reference.lora_embedding_multi(ids, *lowp, scales.double(), index, ranks_t, embed_scale=1.7)
    y_lp = reference.lora_embedding_multi(ids, to(w64), to(a64), to(b64), scales, index, ranks_t, embed_scale=1.7)
    assert_matches(y, y64, y_lp, dtype, "y")
    slot = index.clamp_min(0).long()
    xa64 = lowp[1][slot, :, ids] * scales.double()[slot, None]
    live = (index >= 0)[:, None] & (torch.arange(max(ranks), device=DEVICE) < ranks_t[slot][:, None])
    assert torch.equal(xa[:, max(ranks):], torch.zeros(T, width - max(ranks), device=DEVICE))   # xa's padding
    torch.testing.assert_close(xa[:, :max(ranks)].double(), torch.where(live, xa64, 0), rtol=1e-6, atol=1e-6)


def test_strided_slots_and_int32_ids():
    """Slots as views of a larger stack (the pool's capacity beyond the batch's slots), any strides."""
    torch.manual_seed(2)
    V, d = 23, 17
    a64, b64, ranks, scales = lora_slots64(4, V, d, [4, 2, 4, 1])
    a = a64.float().to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)[:3]    # (3, r, V), V-major
    b = b64.float().to(DEVICE)[:3]
    w = torch.randn(V, d, device=DEVICE)
    ids = torch.randint(0, V, (11,), device=DEVICE, dtype=torch.int32)
    index = torch.randint(-1, 3, (11,), device=DEVICE, dtype=torch.int32)
    y, _ = _launch(ids, w, a, b, index, ranks[:3], scales[:3])
    y64 = reference.lora_embedding_multi(ids.long(), w.double(), a.double(), b.double(), scales[:3].double(),
                                         index.long(), ranks[:3])
    assert_matches(y, y64, None, torch.float32, "y")


def test_ids_outside_the_table_read_nothing():
    """A token id outside [0, V) gets a zero row (the kernel masks its loads rather than reading past E)."""
    V, d = 9, 6
    a64, b64, ranks, scales = lora_slots64(1, V, d, [2])
    w = torch.randn(V, d, device=DEVICE)
    ids = torch.tensor([0, V, -1, 3], device=DEVICE)
    y, _ = _launch(ids, w, a64.float().to(DEVICE), b64.float().to(DEVICE), torch.zeros(4, dtype=torch.long,
                   device=DEVICE), ranks, scales)
    assert torch.equal(y[1:3], torch.zeros(2, d, device=DEVICE))
    assert torch.isfinite(y).all()


def test_empty():
    w = torch.randn(5, 4, device=DEVICE)
    none = torch.empty(0, dtype=torch.long, device=DEVICE)
    y, xa = K.lora_embedding_forward(none, w, torch.zeros(1, 2, 5, device=DEVICE), torch.zeros(1, 4, 2, device=DEVICE),
                                     none, none,
                                     torch.ones(1, dtype=torch.int32, device=DEVICE), torch.ones(1, device=DEVICE),
                                     1.0, 16)
    assert y.shape == (0, 4) and xa.shape == (0, 16)


def test_tokens_in_any_order_still_get_their_own_slot():
    """`order` not sorted by slot (a caller's own grouping): each row still reads its own slot's B, once."""
    torch.manual_seed(7)
    V, d, T = 31, 40, 37
    a64, b64, ranks, scales = lora_slots64(3, V, d, [4, 2, 3])
    w = torch.randn(V, d, device=DEVICE)
    ids = torch.randint(0, V, (T,), device=DEVICE)
    index = torch.randint(-1, 3, (T,), device=DEVICE)
    y = torch.full((T, d), float("nan"), device=DEVICE)
    order = torch.randperm(T, device=DEVICE).to(torch.int32)
    K.lora_embedding_forward(ids, w, a64.float().to(DEVICE), b64.float().to(DEVICE), index, order, ranks, scales,
                             1.0, 16, out=y)
    y64 = reference.lora_embedding_multi(ids, w.double(), a64.to(DEVICE), b64.to(DEVICE), scales.double(), index,
                                         ranks)
    assert_matches(y, y64, None, torch.float32, "y")
