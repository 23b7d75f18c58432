"""Plain-PyTorch definitions of every op: the ground truth for tests, the CPU fallback and a benchmark provider.

Each function here computes exactly what the matching Triton launcher in `ptlm_engine.kernels` computes,
with no fusion; the LoRA ops, like the kernels, accumulate in float32 (float64 on float64 inputs) and round
once to the input dtype (tests upcast the inputs to float64 for the ground truth).
"""
from __future__ import annotations

import torch
from torch import Tensor


def lora_shrink(x: Tensor, lora_A: Tensor, scale: float, keep_mask: Tensor | None = None,
                dropout: float = 0.0) -> Tensor:
    """xa = scale * dropout(x) @ lora_A^T in float32.   x (T, d_in), lora_A (r, d_in) -> (T, r)."""
    x = x.float()
    if keep_mask is not None:
        x = x * keep_mask / (1.0 - dropout)
    return scale * (x @ lora_A.float().t())


def _wide(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(torch.promote_types(dtype, torch.float32))


def read_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t's values rounded to `dtype`, as a kernel reads an fp32 master weight in the layer's dtype, with the
    gradient still in t's own dtype (a cast in the graph would compute it in `dtype`: an fp16 gradient of a
    loss scaled as GradScaler does overflows where PEFT's fp32 one does not)."""
    return t if t.dtype == dtype else t + (t.to(dtype).to(t.dtype) - t).detach()


def _base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool) -> Tensor:
    """x W0^T + bias: the frozen projection every LoRA op adds to (weight as for lora_linear)."""
    y = x @ (weight if fan_in_fan_out else weight.t())
    return y if bias is None else y + bias


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, keep_mask: Tensor | None = None, dropout: float = 0.0,
                fan_in_fan_out: bool = False) -> Tensor:
    """y = x W0^T + bias + scale * dropout(x) A^T B^T.

    x (..., d_in); weight (d_out, d_in), or (d_in, d_out) with fan_in_fan_out (GPT-2's Conv1D);
    lora_A (r, d_in); lora_B (d_out, r), in x's dtype or float32 (master weights): as the kernels, A is read in
    x's dtype, B as it is, and x A^T stays in float32; keep_mask: the dropout keep mask (same shape as x) or None.
    """
    dtype = x.dtype
    x = _wide(x, dtype)
    x_lora = x if keep_mask is None else x * keep_mask / (1.0 - dropout)
    lora = (x_lora @ _wide(read_as(lora_A, dtype), dtype).t()) @ _wide(lora_B, dtype).t()
    return (_base_linear(x, _wide(weight, dtype), _wide(bias, dtype), fan_in_fan_out) + scale * lora).to(dtype)


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                      scales: Tensor, adapter_index: Tensor, fan_in_fan_out: bool = False,
                      dropouts: Tensor | None = None, keep_mask: Tensor | None = None,
                      ranks: Tensor | None = None) -> Tensor:
    """Each token t with its own adapter a = adapter_index[t]:
    y[t] = x[t] W0^T + bias + s_a dropout_a(x[t]) A_a^T B_a^T.

    x (T, d_in); lora_A (S, r_max, d_in) and lora_B (S, d_out, r_max), stacked slots; ranks (S,) each slot's
    rank, whose first ranks[a] rows / columns alone count (as in the kernels), or None: all r_max; scales (S,);
    adapter_index (T,) integer slot per token, -1 for the base model alone; dropouts (S,) per-slot LoRA dropout
    with keep_mask (T, d_in) its keep mask, or None.
    """
    dtype = x.dtype
    x = _wide(x, dtype)
    y = _base_linear(x, _wide(weight, dtype), _wide(bias, dtype), fan_in_fan_out)
    x_lora = x if keep_mask is None else x * keep_mask
    coefs = scales if keep_mask is None else scales / (1.0 - dropouts)                            # (S,)
    if torch.compiler.is_compiling():
        delta = _lora_multi_delta_static(x_lora, read_as(lora_A, dtype), lora_B, coefs, adapter_index, ranks)
        return (y + delta).to(dtype)
    for a in adapter_index.unique().tolist():          # each slot over its own tokens: a mixed batch costs its ranks
        if a < 0:
            continue
        r = lora_A.shape[1] if ranks is None else int(ranks[a])
        rows = (adapter_index == a).nonzero()[:, 0]
        xa = (x_lora[rows] @ _wide(read_as(lora_A[a, :r], dtype), dtype).t()) * coefs[a].to(x.dtype)   # (t_a, r)
        term = xa @ _wide(lora_B[a, :, :r], dtype).t()                                            # (t_a, d_out)
        y = y.to(torch.promote_types(y.dtype, term.dtype))         # autocast may have given y or term bf16
        y.index_add_(0, rows, term.to(y.dtype))                     # y: this call's own, not saved for backward
    return y.to(dtype)


def lora_embedding_multi(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scales: Tensor,
                         adapter_index: Tensor, ranks: Tensor | None = None, padding_idx: int | None = None,
                         embed_scale: float = 1.0) -> Tensor:
    """Each token t with its own adapter a = adapter_index[t]: y[t] = es (E[id_t] + s_a A_a[:, id_t]^T B_a^T).

    ids (T,) token ids; weight E (V, d); lora_A (S, r_max, V) and lora_B (S, d, r_max), stacked slots in PEFT's
    lora_embedding_A / _B layout, of which each slot's first ranks[a] ranks count (None: all r_max); scales (S,);
    adapter_index (T,), -1 for the base embedding alone; es = embed_scale. A's column padding_idx gets no
    gradient (F.embedding's rule, which PEFT's LoRA embedding follows). Accumulates in float32, rounds once.
    """
    dtype = weight.dtype
    wide = torch.promote_types(dtype, torch.float32)
    y = torch.nn.functional.embedding(ids, _wide(weight, dtype), padding_idx)                     # (T, d)
    slot = adapter_index.clamp_min(0).long()
    xa = lora_A[slot, :, ids].to(wide) * scales[slot].to(wide)[:, None]                           # (T, r_max)
    live = (adapter_index >= 0)[:, None]
    if ranks is not None:
        live = live & (torch.arange(lora_A.shape[1], device=ids.device) < ranks[slot][:, None])
    xa = torch.where(live, xa, 0)
    if padding_idx is not None:
        xa = torch.where((ids == padding_idx)[:, None], xa.detach(), xa)
    if torch.compiler.is_compiling():                   # every slot densely, each token keeping its own (see below)
        for a in range(lora_A.shape[0]):
            term = (xa @ _wide(lora_B[a], dtype).t()).to(y.dtype)
            y = torch.where((adapter_index == a)[:, None], y + term, y)
    else:
        for a in adapter_index.unique().tolist():       # each slot over its own tokens
            if a >= 0:
                rows = (adapter_index == a).nonzero()[:, 0]
                # the lookup is no autocast op, the matmul is: its term comes back in y's dtype
                y = y.index_add(0, rows, (xa[rows] @ _wide(lora_B[a], dtype).t()).to(y.dtype))
    return (y * embed_scale).to(dtype)


def _lora_multi_delta_static(x: Tensor, lora_A: Tensor, lora_B: Tensor, coefs: Tensor,
                             adapter_index: Tensor, ranks: Tensor | None) -> Tensor:
    """lora_linear_multi's adapter term without the host's look at which slots occur, for a traced graph: every
    slot runs over all tokens (S dense GEMM pairs, no (T, r_max, d_in) gather) and each token keeps its own slot's
    term, selected (not masked by a product: another slot's NaN stays in that slot's rows). x (T, d_in) widened;
    lora_A already read as the input's dtype."""
    delta = x.new_zeros((x.shape[0], lora_B.shape[1]))                                          # (T, d_out)
    units = torch.arange(lora_A.shape[1], device=x.device)                                       # (r_max,)
    for a in range(lora_A.shape[0]):
        xa = (x @ _wide(lora_A[a], x.dtype).t()) * coefs[a].to(x.dtype)                          # (T, r_max)
        if ranks is not None:
            xa = torch.where(units < ranks[a], xa, 0)                                           # the slot's rank
        term = xa @ _wide(lora_B[a], x.dtype).t()
        delta = torch.where((adapter_index == a)[:, None], term, delta)
    return delta


def _members(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], lora_As: list[Tensor | None],
             fan_in_fan_out: bool, with_adapter) -> list[Tensor]:
    """Each member's output of a grouped op: with_adapter(g), or the base projection where lora_As[g] is None."""
    def base(g):
        wide = [_wide(t, x.dtype) for t in (x, weights[g], biases[g])]
        return _base_linear(*wide, fan_in_fan_out).to(x.dtype)
    return [base(g) if a is None else with_adapter(g) for g, a in enumerate(lora_As)]


def lora_linear_grouped(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], lora_As: list[Tensor | None],
                        lora_Bs: list[Tensor | None], scales: list[float], fan_in_fan_out: bool = False,
                        dropouts: list[float] | None = None,
                        keep_masks: list[Tensor | None] | None = None) -> list[Tensor]:
    """Projections sharing x, each member g as lora_linear: y_g = x W_g^T + bias_g + s_g dropout_g(x) A_g^T B_g^T,
    or x W_g^T + bias_g where lora_As[g] is None (no adapter). keep_masks[g]: member g's keep mask or None."""
    def with_adapter(g):
        keep = None if keep_masks is None else keep_masks[g]
        return lora_linear(x, weights[g], biases[g], lora_As[g], lora_Bs[g], scales[g], keep,
                           0.0 if dropouts is None else dropouts[g], fan_in_fan_out)
    return _members(x, weights, biases, lora_As, fan_in_fan_out, with_adapter)


def lora_linear_multi_grouped(x: Tensor, weights: list[Tensor], biases: list[Tensor | None],
                              lora_As: list[Tensor | None], lora_Bs: list[Tensor | None],
                              scales: list[Tensor | None], adapter_index: Tensor, fan_in_fan_out: bool = False,
                              dropouts: list[Tensor | None] | None = None,
                              keep_masks: list[Tensor | None] | None = None,
                              ranks: list[Tensor | None] | None = None) -> list[Tensor]:
    """Projections sharing x and one per-token mapping, each member g as lora_linear_multi over its own stacked
    slots (lora_As[g] (S, r_max_g, d_in), lora_Bs[g], scales[g] (S,)), or x W_g^T + bias_g where lora_As[g] is
    None. dropouts[g] (S,) with keep_masks[g] (T, d_in): member g's dropout, or None."""
    def with_adapter(g):
        p = None if dropouts is None else dropouts[g]
        keep = None if keep_masks is None else keep_masks[g]
        return lora_linear_multi(x, weights[g], biases[g], lora_As[g], lora_Bs[g], scales[g], adapter_index,
                                 fan_in_fan_out, p, keep, None if ranks is None else ranks[g])
    return _members(x, weights, biases, lora_As, fan_in_fan_out, with_adapter)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None = None,
                     prefix_v: Tensor | None = None, prefix_lengths: Tensor | None = None, *, causal: bool = True,
                     key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """softmax(q [prefix_k ; k]^T * scale, masked) [prefix_v ; v], by concatenation and an explicit mask.

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D), Lk >= Lq, query i at sequence position Lk - Lq + i; q head h reads
    kv head h // (Hq / Hkv). prefix_k, prefix_v (B, Hkv, P, D) or None: seen by every query of the row, unmasked
    except that row b sees only its first prefix_lengths[b] (B,) entries (None: all P). causal: query i sees
    sequence keys j <= Lk - Lq + i; key_padding_mask (B, Lk) bool, True = real key, masks the sequence only.
    A query that sees no key at all outputs 0. Returns (B, Hq, Lq, D) contiguous in q's dtype.
    """
    batch, hq, lq, d = q.shape
    lk = k.shape[2]
    group = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    allowed = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=q.device)                     # (B, 1, Lq, Lk)
    if causal:
        pos_q = torch.arange(lk - lq, lk, device=q.device)
        allowed = allowed & (torch.arange(lk, device=q.device)[None, :] <= pos_q[:, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    if prefix_k is not None:
        p = prefix_k.shape[2]
        seen = torch.ones(batch, p, dtype=torch.bool, device=q.device)                                   # (B, P)
        if prefix_lengths is not None:
            seen = torch.arange(p, device=q.device)[None, :] < prefix_lengths.to(q.device)[:, None]
        allowed = torch.cat([seen[:, None, None, :].expand(batch, 1, lq, p), allowed], dim=-1)
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    k = k.repeat_interleave(group, dim=1)                                                # (B, Hq, P + Lk, D)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale                                          # (B, Hq, Lq, P + Lk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row with no allowed key would softmax to NaN: give it finite scores, then zero its probabilities.
    sees_any = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~sees_any, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    return (probs @ v).contiguous()


BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "silu")  # a bottleneck slot's activation code is its index here
_BOTTLENECK_ACT_FNS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def bottleneck_branch(h: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
                      up_bias: Tensor | None, act: str) -> Tensor:
    """act(h Wd^T + bd) Wu^T + bu, act relu, gelu (exact, erf: nn.GELU()) or silu, in h's dtype.

    float32 master weights on a half-precision h give the values of their h-dtype copies (what serving reads), and
    float32 gradients, from the same branch computed in float32 (see read_as)."""
    F = torch.nn.functional
    act_fn = _BOTTLENECK_ACT_FNS[act]
    weights = (down_weight, down_bias, up_weight, up_bias)
    if down_weight.dtype == h.dtype:
        return F.linear(act_fn(F.linear(h, down_weight, down_bias)), up_weight, up_bias)
    wd, bd, wu, bu = (None if t is None else t.detach().to(h.dtype) for t in weights)
    served = F.linear(act_fn(F.linear(h.detach(), wd, bd)), wu, bu)
    wd, bd, wu, bu = (None if t is None else read_as(t, h.dtype) for t in weights)
    wide = F.linear(act_fn(F.linear(h.to(wd.dtype), wd, bd)), wu, bu)
    return (wide + (served.to(wide.dtype) - wide).detach()).to(h.dtype)


def bottleneck_adapter(h: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
                       up_bias: Tensor | None, act: str = "relu", scale: float = 1.0,
                       residual: Tensor | None = None) -> Tensor:
    """y = (h if residual is None else residual) + scale * (act(h Wd^T + bd) Wu^T + bu).

    h (..., d); down_weight (m, d); down_bias (m,) or None; up_weight (d, m); up_bias (d,) or None;
    residual (..., d) or None.
    """
    return (h if residual is None else residual) + scale * bottleneck_branch(h, down_weight, down_bias, up_weight,
                                                                             up_bias, act)


def bottleneck_adapter_multi(h: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor, up_bias: Tensor,
                             sizes: Tensor, scales: Tensor, acts: Tensor, adapter_index: Tensor,
                             residual: Tensor | None = None) -> Tensor:
    """Each token t with its own adapter a = adapter_index[t], over slot a's first sizes[a] units:
    y[t] = base[t] + s_a (act_a(h[t] Wd_a^T + bd_a) Wu_a^T + bu_a); y[t] = base[t] where a = -1 or sizes[a] = 0.

    h (T, d); base = h, or residual (T, d); down_weight (S, m_max, d); down_bias (S, m_max);
    up_weight (S, d, m_max); up_bias (S, d); sizes, scales, acts (S,), acts indexing BOTTLENECK_ACTIVATIONS;
    adapter_index (T,) integer slot per token.
    """
    base = h if residual is None else residual
    if torch.compiler.is_compiling():
        return base + _bottleneck_multi_delta_static(h, down_weight, down_bias, up_weight, up_bias, sizes, scales,
                                                     acts, adapter_index).to(base.dtype)
    delta = torch.zeros_like(base)
    for a in adapter_index.unique().tolist():
        m = int(sizes[a]) if a >= 0 else 0
        if m == 0:
            continue
        rows = (adapter_index == a).nonzero()[:, 0]
        out = bottleneck_branch(h[rows], down_weight[a, :m], down_bias[a, :m], up_weight[a, :, :m], up_bias[a],
                                BOTTLENECK_ACTIVATIONS[int(acts[a])])
        delta = delta.index_add(0, rows, (scales[a] * out).to(base.dtype))
    return base + delta


def _bottleneck_multi_delta_static(h: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                                   up_bias: Tensor, sizes: Tensor, scales: Tensor, acts: Tensor,
                                   adapter_index: Tensor) -> Tensor:
    """bottleneck_adapter_multi's scaled branch without the host's look at which slots occur, for a traced graph:
    every slot runs over all tokens (S dense passes, no (T, m_max, d) gather) and each token keeps its own,
    selected (another slot's NaN stays in that slot's rows)."""
    act_fns = [_BOTTLENECK_ACT_FNS[name] for name in BOTTLENECK_ACTIVATIONS]
    units = torch.arange(down_weight.shape[1], device=h.device)                                 # (m_max,)
    delta = torch.zeros_like(h)
    wide = h.to(down_weight.dtype)                  # float32 masters on a half h: computed as bottleneck_branch
    down_weight, down_bias, up_weight, up_bias = (read_as(t, h.dtype)
                                                  for t in (down_weight, down_bias, up_weight, up_bias))
    for a in range(down_weight.shape[0]):
        z = torch.nn.functional.linear(wide, down_weight[a], down_bias[a])                 # (T, m_max)
        z = sum(torch.where(acts[a] == code, fn(z), 0) for code, fn in enumerate(act_fns))
        z = torch.where(units < sizes[a], z, 0)                                            # the slot's own width
        out = torch.nn.functional.linear(z, up_weight[a], up_bias[a])                      # (T, d)
        mine = (adapter_index == a) & (sizes[a] > 0)                                       # (T,)
        delta = delta + torch.where(mine[:, None], scales[a] * out, 0).to(h.dtype)
    return delta


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: weight * cast(x * rsqrt(mean(x^2) + eps)), the statistics in float32 (float64
    for float64 x), the normalized x rounded to x's dtype before the multiply.   x (..., d), weight (d,)."""
    stats = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = stats * torch.rsqrt(stats.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, as a gated MLP's act_fn(gate_proj(x)) * up_proj(x) with act silu.   gate, up (..., F)."""
    return torch.nn.functional.silu(gate) * up


def rotate_half(x: Tensor) -> Tensor:
    """[-x2, x1] for the halves x1, x2 of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb: (q cos + rotate_half(q) sin, k cos + rotate_half(k) sin), cos and sin
    (B, L, D) unsqueezed at unsqueeze_dim: q (B, Hq, L, D), k (B, Hk, L, D) with 1, (B, L, H, D) with 2."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def cross_entropy_chunk(logits: Tensor, targets: Tensor, grad_scale: Tensor | float | None, ignore_index: int = -100,
                        write_grad: bool = True) -> Tensor:
    """kernels.cross_entropy.cross_entropy_chunk: per-row loss logsumexp(x) - x[target] (0 where ignored) in float32
    (float64 for float64 logits); with write_grad the logits (C, V) are overwritten with
    (softmax(x) - onehot(target)) * grad_scale, zero rows where ignored.   targets (C,) integer."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ignored = targets == ignore_index
    safe = targets.masked_fill(ignored, 0)[:, None]                                   # (C, 1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)                                    # (C, 1)
    loss = (lse - x.gather(1, safe))[:, 0].masked_fill(ignored, 0.0)
    if write_grad:
        grad = torch.exp(x - lse).scatter_add(1, safe, torch.full_like(lse, -1.0)) * grad_scale
        logits.copy_(grad.masked_fill(ignored[:, None], 0.0))
    return loss


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", bias: Tensor | None = None) -> Tensor:
    """transformers' causal-LM loss on the lm_head's logits: cross_entropy((hidden W^T + bias) upcast to float32,
    targets). hidden (..., d); weight (V, d); targets (...) integer; the logits are rounded to hidden's dtype
    before the upcast, as HF's lm_head output is."""
    logits = hidden @ weight.t()
    logits = logits if bias is None else logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)
