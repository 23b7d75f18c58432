"""The plain-PyTorch reference (ptlm_engine/reference.py), the CPU fallback: its numerics against float64."""
import pytest
import torch

import ptlm_engine as pe
from ptlm_engine import reference
from tests.helpers import randomize_trainable64, run_alone


# --------------------------------------------------------------------- half precision: the LoRA branch's rounding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_ops_in_half_precision_round_once_with_an_fp32_intermediate(dtype):
    """README ("Backends and dtypes"): on a half-precision base the fused op runs in the base dtype "with its r-wide
    intermediate in fp32"; the kernels keep xa = s·x·Aᵀ in fp32, read B as fp32 and round once, PEFT too computes
    the LoRA branch in fp32 and rounds once, and the CPU reference (the default off CUDA) computes the same. With
    W0 = 0 each output is then one rounding of s·(x A_h^T) B^T (A_h: A read as x's dtype, here representable):
    |err| <= 1 eps·|exact| per element (the Triton kernel under the interpreter gives 0.79 in fp16). Rounding xa,
    B and the products to half precision, as the reference once did, gives errors over a hundred times that bound
    where the r terms cancel. Tolerance: 1 eps·|exact| + 2^-20·rms (fp32 sums)."""
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, r = 64, 64, 48, 8
    x = torch.randn(T, d_in, generator=g).to(dtype)
    weight = torch.zeros(d_out, d_in, dtype=dtype)
    lora_A = (0.2 * torch.randn(r, d_in, generator=g)).to(dtype).float()      # fp32 master weights
    lora_B = 0.2 * torch.randn(d_out, r, generator=g)
    y = reference.lora_linear(x, weight, None, lora_A, lora_B, 2.0)
    multi = reference.lora_linear_multi(x, weight, None, lora_A[None], lora_B[None], torch.tensor([2.0]),
                                        torch.zeros(T, dtype=torch.int32))
    exact = 2.0 * (x.double() @ lora_A.double().t()) @ lora_B.double().t()
    eps = torch.finfo(dtype).eps
    bound = eps * exact.abs() + 2.0 ** -20 * exact.pow(2).mean().sqrt()
    for out in (y, multi):
        worst = ((out.double() - exact).abs() / bound).max().item()
        assert out.dtype == dtype
        assert worst <= 1.0, f"error up to {worst:.1f}x the one-rounding bound"


# ------------------------------------------------------------------------- mixed batch: one slot's NaN
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_lora_multi_rows_keep_out_of_another_slots_nan(traced):
    """A NaN in slot 0's lora_A (a diverged adapter) reaches slot 0's tokens only: a token with index -1 gets
    x W0^T + bias and the other slots' tokens their own terms, as with the Triton kernels and as each row run
    alone. Eagerly and traced (torch.compile fullgraph: a static-cache compiled generate on a CPU or float64
    model), where every slot runs over all tokens and each token's term is selected, not masked by a product
    (regression: masked by a product, 0 · NaN = NaN put slot 0's NaN into the -1 rows, traced into every row)."""
    g = torch.Generator().manual_seed(4)
    T, d_in, d_out, ranks = 4, 7, 5, [4, 2, 1]
    x = torch.randn(T, d_in, generator=g)
    weight, bias = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    lora_A = torch.randn(3, 4, d_in, generator=g)
    lora_B = torch.randn(3, d_out, 4, generator=g)
    for s, r in enumerate(ranks):                                                     # zeros beyond each rank
        lora_A[s, r:], lora_B[s, :, r:] = 0, 0
    scales, index = torch.tensor([0.5, 1.5, 0.75]), torch.tensor([1, -1, 2, 0])
    want = reference.lora_linear_multi(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(),
                                       scales.double(), index)
    lora_A[0, 0, 0] = float("nan")
    fn = reference.lora_linear_multi
    if traced:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="eager", fullgraph=True)
    y = fn(x, weight, bias, lora_A, lora_B, scales, index)
    assert torch.isnan(y[3]).all()                                                  # slot 0's own row
    assert torch.isfinite(y[:3]).all(), f"rows without slot 0 became NaN: {torch.isnan(y).any(1).tolist()}"
    torch.testing.assert_close(y[:3].double(), want[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1].double(), x[1].double() @ weight.double().t() + bias.double())


def test_float64_model_mixed_batch_rows_keep_out_of_a_diverged_adapters_nan(tiny, ids):
    """A float64 model (served by the reference, whatever the backend) maps rows to adapter "a", to the base model
    (None) and to "b"; "a" has diverged (a NaN in one lora_A weight). The rows without "a" are those they give
    alone: the None row is the base model's output (regression: it came out all NaN)."""
    model = tiny("llama").double()
    for name, r in (("a", 4), ("b", 2)):
        pe.add_adapter(model, name, pe.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    randomize_trainable64(model, seed=1)                                            # "a", the active one
    pe.set_active_adapter(model, "b")
    randomize_trainable64(model, seed=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A["a"].weight[0, 0] = float("nan")
        ids = torch.cat([ids, ids[:1]])
        with pe.adapter_batch(model, ["a", None, "b"]):
            mixed = model(input_ids=ids).logits
        alone = [run_alone(model, name, lambda: model(input_ids=ids[row:row + 1]).logits[0])
                 for row, name in ((1, None), (2, "b"))]
    assert torch.isnan(mixed[0]).all()
    torch.testing.assert_close(mixed[1], alone[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixed[2], alone[1], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------- bottleneck mixed batch, traced
def test_bottleneck_multi_traced_equals_eager_with_grads():
    """Traced (torch.compile fullgraph), the mixed-batch bottleneck cannot look on the host at which slots occur:
    every slot runs densely and each token keeps its own. Same outputs and gradients as the eager loop, with an
    empty slot (width 0: its tokens pass through), rows with no adapter (-1), mixed widths and activations."""
    g = torch.Generator().manual_seed(3)
    T, d, m_max, S = 11, 10, 5, 4
    sizes = torch.tensor([5, 3, 0, 2], dtype=torch.int32)
    width = (torch.arange(m_max)[None] < sizes[:, None]).double()                     # (S, m_max)
    tensors = [torch.randn(T, d, generator=g, dtype=torch.float64),
               torch.randn(S, m_max, d, generator=g, dtype=torch.float64) * width[..., None],
               torch.randn(S, m_max, generator=g, dtype=torch.float64) * width,
               torch.randn(S, d, m_max, generator=g, dtype=torch.float64) * width[:, None],
               torch.randn(S, d, generator=g, dtype=torch.float64),
               torch.randn(T, d, generator=g, dtype=torch.float64)]
    scales, acts = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=torch.float64), torch.tensor([1, 2, 0, 1])
    index = torch.tensor([0, 1, -1, 2, 3, 0, 1, 3, -1, 0, 1])

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in tensors]
        h, wd, bd, wu, bu, res = leaves
        y = fn(h, wd, bd, wu, bu, sizes, scales, acts, index, res)
        y.pow(2).sum().backward()
        return y.detach(), [t.grad for t in leaves]

    eager, eager_grads = run(reference.bottleneck_adapter_multi)
    torch._dynamo.reset()
    traced, traced_grads = run(torch.compile(reference.bottleneck_adapter_multi, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(traced, eager)
    for got, want in zip(traced_grads, eager_grads):
        torch.testing.assert_close(got, want)
    assert torch.equal(eager[[2, 3, 8]], tensors[5][[2, 3, 8]])                     # -1 rows and the empty slot
