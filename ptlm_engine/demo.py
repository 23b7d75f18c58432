"""`ptlm demo`: the whole adapter lifecycle on a tiny random Llama, in a few seconds on a CPU.

Builds the model from a config (no download), adds a LoRA adapter, trains it with AdamW to continue a fixed
repeating token pattern, saves it in PEFT's layout, loads it into a fresh copy of the base and prints how base,
adapted and reloaded models compare. The exit status is 1 when the reloaded model computes something other
than the adapted one. On CUDA it also times the fused lora_linear kernel against cuBLAS and eager LoRA.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from ptlm_engine import functional
from ptlm_engine.ops import lora as lora_ops

ADAPTER = "demo"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
VOCAB, PATTERN_LEN, SEQ_LEN, BATCH = 64, 16, 32, 16
DEFAULT_STEPS, LR = 40, 1e-2
# The Triton shrink kernel splits its reduction across programs with atomic adds on CUDA, so two runs of the
# same fp32 model may differ in the last bits; anything beyond that is a real save/load mismatch.
MATCH_TOL = 1e-4
# Fused-kernel timings on CUDA: (d_in, d_out), token counts, rank, dtype.
KERNEL_SHAPE, KERNEL_TOKENS, KERNEL_RANK, KERNEL_DTYPE = (4096, 4096), (1, 16, 4096), 16, torch.bfloat16


def build_base_model(device: torch.device) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights. initializer_range is 10x Llama's 0.02: with the default, the
    untrained lm_head's logits are so small that no adapter on the blocks can make a prediction confident, and
    the loss would stall near 3 even at 100% accuracy."""
    torch.manual_seed(SEED)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=SEQ_LEN,
                         initializer_range=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(config).to(device).eval()


class PatternTask:
    """Continue a fixed cycle of PATTERN_LEN distinct tokens: every sequence is a window of the repeated
    pattern starting at some offset, so each next token is determined by the current one."""

    def __init__(self, device: torch.device):
        self.generator = torch.Generator().manual_seed(SEED)
        self.pattern = torch.randperm(VOCAB, generator=self.generator)[:PATTERN_LEN]
        self.device = device

    def windows(self, offsets: torch.Tensor) -> torch.Tensor:
        """(len(offsets), SEQ_LEN) token ids."""
        positions = (offsets[:, None] + torch.arange(SEQ_LEN)) % PATTERN_LEN
        return self.pattern[positions].to(self.device)

    def train_batch(self) -> torch.Tensor:
        return self.windows(torch.randint(0, PATTERN_LEN, (BATCH,), generator=self.generator))

    def eval_batch(self) -> torch.Tensor:
        """One window per offset: every transition of the pattern at every position."""
        return self.windows(torch.arange(PATTERN_LEN))


@dataclass
class Scores:
    loss: float
    accuracy: float        # next-token argmax accuracy over all positions
    logits: torch.Tensor


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> Scores:
    out = model(input_ids=ids, labels=ids)
    accuracy = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    return Scores(out.loss.item(), accuracy, out.logits)


def train(model: torch.nn.Module, task: PatternTask, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for _ in range(steps):
        ids = task.train_batch()
        loss = model(input_ids=ids, labels=ids).loss   # causal-LM loss: the model shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def backend_name(device: torch.device) -> str:
    """What the LoRA layers run for this demo's fp32 tensors: Triton kernels or the PyTorch reference."""
    probe = torch.empty(1, device=device)
    if not lora_ops.triton_enabled(probe):
        return "reference (PyTorch)"
    return "triton (interpreter)" if device.type == "cpu" else "triton"


def comparison_table(base: Scores, adapted: Scores, reloaded: Scores, steps: int) -> list[str]:
    columns = [("base", base), (f"adapted ({steps} steps)", adapted), ("reloaded", reloaded)]
    widths = [max(len(name), 8) + 3 for name, _ in columns]
    rows = [("toy-task loss", [f"{s.loss:.4f}" for _, s in columns]),
            ("next-token accuracy", [f"{100 * s.accuracy:.1f}%" for _, s in columns]),
            ("max |logits - adapted|", [f"{(s.logits - adapted.logits).abs().max().item():.3g}"
                                        for _, s in columns])]
    lines = [f"{'':24}" + "".join(f"{name:>{w}}" for (name, _), w in zip(columns, widths))]
    lines += [f"{label:24}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths)) for label, values in rows]
    return lines


def kernel_timings(device: torch.device, dtype: torch.dtype = KERNEL_DTYPE, shape: tuple[int, int] = KERNEL_SHAPE,
                   tokens: tuple[int, ...] = KERNEL_TOKENS, rank: int = KERNEL_RANK) -> list[str]:
    """Forward medians (triton.testing.do_bench, which flushes L2 before each call) of ptlm's fused
    lora_linear, the bare base layer F.linear (cuBLAS: the cost without LoRA) and eager LoRA
    F.linear(x, W) + s (x A^T) B^T. The first ptlm call of each T autotunes, outside the timing."""
    from triton.testing import do_bench

    d_in, d_out = shape
    scale = 2.0
    gen = torch.Generator(device).manual_seed(SEED)

    def rand(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype) * 0.05

    weight, lora_A, lora_B = rand(d_out, d_in), rand(rank, d_in), rand(d_out, rank)
    lines = [f"fused LoRA forward, {str(dtype).removeprefix('torch.')}, {d_in}x{d_out}, r={rank}, "
             f"lora_linear on {backend_name(device).split()[0]}: median ms (triton.testing.do_bench)",
             f"{'T':>6}{'cuBLAS (no LoRA)':>18}{'eager LoRA':>12}{'lora_linear':>13}{'vs cuBLAS':>11}"
             f"{'vs eager':>10}"]
    with torch.no_grad():
        for t in tokens:
            x = rand(t, d_in)
            cublas = do_bench(lambda: F.linear(x, weight), return_mode="median")
            eager = do_bench(lambda: F.linear(x, weight) + scale * ((x @ lora_A.T) @ lora_B.T),
                             return_mode="median")
            fused = do_bench(lambda: functional.lora_linear(x, weight, None, lora_A, lora_B, scale),
                             return_mode="median")
            lines.append(f"{t:>6}{cublas:>18.4f}{eager:>12.4f}{fused:>13.4f}{fused / cublas:>10.2f}x"
                         f"{fused / eager:>9.2f}x")
    return lines


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def available_device(text: str) -> str:
    """A device string torch parses and this machine has (cpu, or an existing cuda index)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from e
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no such CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the demo runs on cpu or cuda")
    return text


def directory(text: str) -> str:
    """A directory path, existing or to be made (checked before training, not when saving after it)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=non_negative_int, default=DEFAULT_STEPS,
                        help="AdamW training steps (default %(default)s)")
    parser.add_argument("--out", metavar="DIR", type=directory,
                        help="keep the saved adapter in DIR (default: a temporary directory, removed at the end)")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device: cpu or cuda[:N] (default %(default)s)")


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a CPU demo on one intra-op thread, restoring the count afterwards. Matmuls this small gain nothing
    from more threads, and where the cores are busy their spin-waits cost far more than the work: with 2
    threads on a loaded 2-core machine one (512, 64) x (64, 64) matmul took 1-13 ms against 0.1 ms on one,
    and the demo's 40 steps 9 s against 1 s."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(steps: int = DEFAULT_STEPS, out: str | None = None, device: str = "cpu") -> int:
    """The demo; returns the exit status (0 when the reloaded adapter reproduces the adapted model)."""
    start = time.perf_counter()
    device = torch.device(device)
    with one_cpu_thread(device):
        backend = backend_name(device)
        task = PatternTask(device)
        eval_ids = task.eval_batch()

        base_model = build_base_model(device)
        model = copy.deepcopy(base_model)
        pe.add_adapter(model, ADAPTER, pe.LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

        train_start = time.perf_counter()
        train(model, task, steps)
        train_s = time.perf_counter() - train_start
        adapted = evaluate(model, eval_ids)
        with pe.disable_adapters(model):
            base = evaluate(model, eval_ids)

        with tempfile.TemporaryDirectory() as scratch:
            adapter_dir = out or os.path.join(scratch, ADAPTER)
            pe.save_adapter(model, ADAPTER, adapter_dir)
            files = {name: os.path.getsize(os.path.join(adapter_dir, name))
                     for name in sorted(os.listdir(adapter_dir))}
            reloaded_model = copy.deepcopy(base_model)
            pe.load_adapter(reloaded_model, adapter_dir, name=ADAPTER)
        reloaded = evaluate(reloaded_model, eval_ids)
        mismatch = (reloaded.logits - adapted.logits).abs().max().item()

    print(f"ptlm demo: LoRA on a tiny random Llama, learning to continue a repeating {PATTERN_LEN}-token pattern")
    print(f"  model    hidden 64, 2 layers, 4 heads (2 kv), vocab {VOCAB}, fp32, on {device}")
    print(f"  adapter  {ADAPTER!r}: r=8, alpha=16 on {', '.join(TARGETS)}")
    print(f"  params   {trainable:,} trainable of {total:,} ({100 * trainable / total:.1f}%)")
    print(f"  backend  {backend}")
    print(f"  training {steps} AdamW steps (lr {LR:g}, batch {BATCH} x {SEQ_LEN} tokens) in {train_s:.2f} s")
    print(f"  saved    {', '.join(f'{n} ({size:,} B)' for n, size in files.items())}"
          f" in {out if out else 'a temporary directory (removed)'}; reloaded into a fresh copy of the base")
    print()
    print("  base: adapters disabled, which is also the model before training (a new adapter is the identity)")
    print("\n".join("  " + line for line in comparison_table(base, adapted, reloaded, steps)))
    print()
    if device.type == "cuda":
        print("\n".join("  " + line for line in kernel_timings(device)))
        print()
    elif backend.startswith("reference"):
        print("  (with TRITON_INTERPRET=1 set, the Triton kernels run here in Triton's interpreter: correct, "
              "but tens of seconds per step)")
    ok = mismatch <= MATCH_TOL
    print(f"  reloaded vs adapted: max abs diff {mismatch:.3g} {'<=' if ok else '>'} {MATCH_TOL:g}: "
          f"{'OK' if ok else 'MISMATCH'}")
    print(f"  wall time {time.perf_counter() - start:.1f} s (after imports)")
    return 0 if ok else 1
