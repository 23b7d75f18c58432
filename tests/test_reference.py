"""The plain-PyTorch reference (ptlm_engine/reference.py), the CPU fallback: its numerics against float64."""
import pytest
import torch

from ptlm_engine import reference


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
