"""The LoRA-embedding ops (custom ops + autograd) against float64 references: one adapter and per-token
adapters, gradients of A, B and a trainable table, padding_idx, an output scale, bad input, torch.library
checks, torch.compile."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import LoraSlots, lora_embedding, lora_embedding_multi, token_segments
from ptlm_engine.ops.lora_embedding import lora_embedding_fwd
from tests.helpers import CUDA, DEVICE, DTYPES, assert_grads_match, assert_no_host_sync, captured, leaves, \
    lora_slots64, needs_triton

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def _inputs(lead, V, d, ranks, dtype, train_table=False):
    a64, b64, ranks_t, scales = lora_slots64(len(ranks), V, d, ranks)
    to = lambda t: t.to(DEVICE, dtype).requires_grad_()
    w = torch.randn(V, d, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(train_table)
    ids = torch.randint(0, V, lead, device=DEVICE)
    index = torch.randint(-1, len(ranks), lead, device=DEVICE)
    return ids, w, LoraSlots(to(a64), to(b64), ranks_t, scales), index


def _run(ids, w, slots, index, dy, padding_idx, embed_scale, op):
    """(y, [dA, dB, dE]) of `op` on fresh leaves of these values in w's dtype (op=None: the reference)."""
    w, a, b = leaves([w, slots.lora_A, slots.lora_B], w.dtype)
    s = LoraSlots(a, b, slots.ranks, slots.scales if op else slots.scales.to(torch.promote_types(w.dtype,
                                                                                              torch.float32)))
    if op is None:
        y = reference.lora_embedding_multi(ids.reshape(-1), w, a, b, s.scales, index.reshape(-1), s.ranks,
                                           padding_idx, embed_scale).reshape(dy.shape)
    else:
        y = op(ids, w, s, index, padding_idx, embed_scale)
    y.backward(dy)
    return y.detach(), [t.grad for t in (a, b, w)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,V,d,ranks,train_table", [((3, 9), 37, 26, [8, 3, 16], False),
                                                       ((2, 37), 50, 19, [4, 1], True)])
def test_multi_forward_backward_matches_float64(backend, lead, V, d, ranks, train_table, dtype, monkeypatch):
    """Each slot's A and B get the gradient of its own tokens; A's padding_idx column gets none (F.embedding's
    rule, which PEFT's layer inherits); the table's gradient where it trains."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    torch.manual_seed(len(lead) + V)
    ids, w, slots, index = _inputs(lead, V, d, ranks, dtype, train_table)
    ids.view(-1)[:3] = 5                                    # padding tokens in every slot's rows, likely
    dy = torch.randn(*lead, d, dtype=torch.float64).to(DEVICE, dtype)
    y, grads = _run(ids, w, slots, index, dy, 5, 1.3, lora_embedding_multi)
    y64, grads64 = _run(ids, w.double(), LoraSlots(*(t.double() for t in slots[:2]), *slots[2:4]), index,
                        dy.double(), 5, 1.3, None)
    y_lp, grads_lp = _run(ids, w, slots, index, dy, 5, 1.3, None)
    assert y.shape == (*lead, d) and y.dtype == dtype
    assert_grads_match(["y"], [y], [y64], [y_lp], dtype)
    assert_grads_match(["dA", "dB", "dE"], grads, grads64, grads_lp, dtype)
    assert torch.equal(grads[0][:, :, 5], torch.zeros_like(grads[0][:, :, 5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_adapter_equals_the_float64_formula(backend, monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", backend)
    torch.manual_seed(4)
    V, d, r = 29, 21, 6
    w = torch.randn(V, d, device=DEVICE)
    a = torch.randn(r, V, device=DEVICE, requires_grad=True)
    b = torch.randn(d, r, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, V, (4, 5), device=DEVICE)
    y = lora_embedding(ids, w, a, b, 0.75, embed_scale=2.0)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    y64 = 2.0 * (w.double()[ids] + 0.75 * a64[:, ids].permute(1, 2, 0) @ b64.t())
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def test_float32_adapters_on_a_half_table_get_float32_gradients():
    """Master weights: float32 A and B on a float16 table train in float32, as the LoRA layers' adapters do."""
    w = torch.randn(11, 8, dtype=torch.float16, device=DEVICE)
    a = torch.randn(3, 11, device=DEVICE, requires_grad=True)
    b = torch.randn(8, 3, device=DEVICE, requires_grad=True)
    y = lora_embedding(torch.tensor([[1, 2, 10]], device=DEVICE), w, a, b, 0.5)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("bad,message", [
    (dict(ids=torch.tensor([0.0, 1.0])), "ids: expected integer"),
    (dict(ids=torch.tensor([0, 9])), "ids: expected token ids in"),
    (dict(index=torch.tensor([0])), "adapter_index: expected integers of shape"),
    (dict(index=torch.tensor([0, 2])), "adapter_index: expected slot ids"),
    (dict(ranks=torch.tensor([5, 1], dtype=torch.int32)), "ranks: expected values"),
    (dict(dropouts=torch.tensor([0.1, 0.0])), "dropouts: LoRA on an embedding"),
    (dict(lora_A=torch.zeros(2, 3, 8)), r"lora_A: expected stacked slots \(S, r_max, 9\)"),
])
def test_bad_input_raises_a_clear_error(bad, message):
    slots = LoraSlots(torch.zeros(2, 3, 9), torch.zeros(2, 4, 3), torch.tensor([3, 1], dtype=torch.int32),
                      torch.ones(2), None)
    slots = slots._replace(**{k: v for k, v in bad.items() if k in LoraSlots._fields})
    ids, index = bad.get("ids", torch.tensor([0, 1])), bad.get("index", torch.tensor([0, -1]))
    with pytest.raises((ValueError, IndexError), match=message):
        lora_embedding_multi(ids, torch.zeros(9, 4), slots, index)


@needs_triton
def test_custom_op_passes_opcheck():
    torch.manual_seed(8)
    ids, w, slots, index = _inputs((7,), 13, 12, [4, 8], torch.float32)
    index = index.to(torch.int32)
    order, bounds = token_segments(index, 2)
    args = (ids, w, slots.lora_A, slots.lora_B, slots.ranks, slots.scales, index, order, bounds, 3, 1.5)
    torch.library.opcheck(lora_embedding_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", backend)
    torch.manual_seed(9)
    ids, w, slots, index = _inputs((2, 5), 17, 12, [4, 8], torch.float32)
    compiled = torch.compile(lambda i, idx: lora_embedding_multi(i, w, slots, idx), backend="aot_eager",
                             fullgraph=True)
    y = compiled(ids, index)
    y.sum().backward()
    y64 = reference.lora_embedding_multi(ids.reshape(-1), w.double(), slots.lora_A.double(), slots.lora_B.double(),
                                         slots.scales.double(), index.reshape(-1), slots.ranks)
    torch.testing.assert_close(y.double(), y64.reshape(y.shape), rtol=1e-5, atol=1e-5)
    assert slots.lora_A.grad is not None and slots.lora_B.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_forward_has_no_host_sync_and_replays_in_a_cuda_graph_with_a_new_mapping():
    torch.manual_seed(10)
    ids, w, slots, index = _inputs((300,), 32000, 2048, [8, 16, 64], torch.bfloat16)
    slots = LoraSlots(slots.lora_A.detach(), slots.lora_B.detach(), slots.ranks, slots.scales)
    index = index.to(torch.int32)
    run = lambda: lora_embedding_multi(ids, w, slots, index)
    assert_no_host_sync(run)
    graph, y = captured(run)
    index.copy_(torch.randint(-1, 3, (300,), device=DEVICE, dtype=torch.int32))
    graph.replay()
    y64 = reference.lora_embedding_multi(ids, w.double(), slots.lora_A.double(), slots.lora_B.double(),
                                         slots.scales.double(), index, slots.ranks)
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
