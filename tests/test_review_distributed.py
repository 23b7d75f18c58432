"""Review: distributed and memory-saving training with injected adapters (CPU only).

- DistributedDataParallel over gloo, 2 processes on 127.0.0.1: each rank's gradients after backward equal the
  single-process gradient of the concatenated batch (HF's mean causal-LM loss), parameters stay identical across
  ranks after optimizer steps, for LoRA (Llama, GPT-2's Conv1D), bottleneck, prefix, mixed batches of two LoRA
  adapters (pe.adapter_batch through the DDP wrapper), find_unused_parameters with an adapter absent from one rank,
  no_sync gradient accumulation, non-reentrant checkpointing under DDP, and one case on the Triton interpreter.
- FSDP2 (torch.distributed.fsdp.fully_shard) over gloo on the CPU with a LoRA adapter.
- Gradient checkpointing (HF, both torch.utils.checkpoint flavours) for every method and a mixed batch, gradient
  accumulation over micro-batches of different mappings, torch.utils.checkpoint around a plain PyTorch block.

All distributed scenarios run in ONE pair of worker processes (forked from the test process, so no second
import of torch / transformers), started once per module by the `dist_results` fixture; each scenario records
its gradients / parameters / errors and the tests compare them with a single-process run of the whole batch.
Float64 models on the reference backend: results agree to rounding.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import multiprocessing
import os
import socket
import tempfile
import traceback
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from tests.helpers import needs_triton

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB = 128
WORLD = 2
ROWS = 2            # rows per rank
LENGTH = 6
LR = 1e-2
STEPS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread (the machine is shared; OpenMP barriers on a busy host cost more than the
    ops), put back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ models
def _llama(dtype=torch.float64, hidden=32, layers=2):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=48,
                                            vocab_size=VOCAB)).to(dtype)


def _tiny_llama32():
    """For the Triton interpreter: float32, odd-ish tiny shapes, one layer."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=40, vocab_size=VOCAB))


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).to(dtype)


def _owned(n: str, name: str) -> bool:
    """Whether parameter `n` belongs to adapter `name` (LoRA / bottleneck / prefix: '.name.'; prompt: ends so)."""
    return f".{name}." in n or n.endswith(f".{name}")


def _is_adapter(n: str) -> bool:
    return any(k in n for k in (".lora_", "ptlm_"))


def _randomize(model):
    """Seeded (by parameter name) random values in every adapter tensor: LoRA B / bottleneck up start at 0."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if _is_adapter(n):
                gen = torch.Generator().manual_seed(zlib.crc32(n.encode()))
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _ids(rows=WORLD * ROWS, length=LENGTH, seed=3):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


LORA_QV = lambda r=3: pe.LoraConfig(r=r, alpha=5, target_modules=["q_proj", "v_proj"])

# name -> spec. build: the model; adapters: [(name, config factory)]; mapping: the WHOLE batch's rows (rank r gets
# rows r*ROWS ...), None: the first adapter active; ddp: DistributedDataParallel kwargs; train: adapters made
# trainable before wrapping (mixed batches: all of them, or DDP never sees the others); wrap: "ddp" / "fsdp2".
SPECS = {
    "llama_lora": dict(build=_llama, adapters=[("a", LORA_QV)]),
    "gpt2_lora": dict(build=_gpt2, adapters=[("a", lambda: pe.LoraConfig(r=3, target_modules=["c_attn"]))]),
    "llama_bottleneck": dict(build=_llama, adapters=[("a", lambda: pe.BottleneckConfig(bottleneck=4,
                                                                                        placement="houlsby"))]),
    "llama_prefix": dict(build=_llama, adapters=[("a", lambda: pe.PrefixConfig(num_virtual_tokens=3,
                                                                                projection=True))]),
    "gpt2_prefix": dict(build=_gpt2, adapters=[("a", lambda: pe.PrefixConfig(num_virtual_tokens=2))]),
    "llama_prompt": dict(build=_llama, adapters=[("a", lambda: pe.PromptConfig(num_virtual_tokens=2))]),
    # Both adapters on both ranks: plain DDP (find_unused_parameters=False) is enough.
    "mixed_lora": dict(build=_llama, adapters=[("a", LORA_QV), ("b", lambda: LORA_QV(2))],
                       mapping=["a", "b", "b", "a"], train=["a", "b"]),
    # b has no row on rank 1: find_unused_parameters=True averages rank 0's gradient with rank 1's nothing.
    "mixed_lora_unused_fup": dict(build=_llama, adapters=[("a", LORA_QV), ("b", lambda: LORA_QV(2))],
                                  mapping=["a", "b", "a", None], train=["a", "b"],
                                  ddp=dict(find_unused_parameters=True)),
    # Mixed LoRA + bottleneck adapters, b absent on rank 0.
    "mixed_lora_bottleneck_fup": dict(build=_llama, adapters=[("a", LORA_QV),
                                                              ("b", lambda: pe.BottleneckConfig(bottleneck=3))],
                                      mapping=["a", "a", "b", "a"], train=["a", "b"],
                                      ddp=dict(find_unused_parameters=True)),
    # The pitfall: DDP wrapped after set_active_adapter("a") registers a's parameters only (DDP keeps those that
    # require grad at construction); a mixed batch then trains b on each rank without averaging.
    "mixed_lora_b_frozen_at_wrap": dict(build=_llama, adapters=[("a", LORA_QV), ("b", lambda: LORA_QV(2))],
                                        mapping=["a", "b", "b", "a"]),
    # Non-reentrant HF gradient checkpointing under DDP.
    "llama_lora_checkpointing": dict(build=_llama, adapters=[("a", LORA_QV)], checkpointing=True),
    "mixed_lora_checkpointing": dict(build=_llama, adapters=[("a", LORA_QV), ("b", lambda: LORA_QV(2))],
                                     mapping=["a", "b", "b", "a"], train=["a", "b"], checkpointing=True),
    # FSDP2: each decoder layer and the root sharded over both ranks.
    "fsdp2_lora": dict(build=_llama, adapters=[("a", LORA_QV)], wrap="fsdp2"),
    "fsdp2_mixed_lora": dict(build=_llama, adapters=[("a", LORA_QV), ("b", lambda: LORA_QV(2))],
                             mapping=["a", "b", "b", "a"], train=["a", "b"], wrap="fsdp2"),
}
TRITON_SPEC = dict(build=_tiny_llama32, adapters=[
    ("a", lambda: pe.LoraConfig(r=3, target_modules=["q_proj", "v_proj"])),
    ("b", lambda: pe.LoraConfig(r=2, target_modules=["q_proj"]))],
                   mapping=["a", "b", "b", "a"], train=["a", "b"], backend="triton", length=3)


def _setup(spec):
    model = spec["build"]()
    for name, config in spec["adapters"]:
        pe.add_adapter(model, name, config())
    _randomize(model)
    pe.set_active_adapter(model, spec["adapters"][0][0])
    for name in spec.get("train", []):
        for n, p in model.named_parameters():
            if _owned(n, name):
                p.requires_grad_(True)
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _batch(spec, rank=None):
    """(ids, mapping) of the whole batch (rank None) or of one rank's rows."""
    rows = spec.get("rows", ROWS)
    ids = _ids(WORLD * rows, spec.get("length", LENGTH))
    mapping = spec.get("mapping")
    if rank is None:
        return ids, mapping
    part = slice(rank * rows, (rank + 1) * rows)
    return ids[part], (mapping[part] if mapping else None)


def _train(module, model, ids, mapping, steps=STEPS, sync=None):
    """`steps` AdamW steps of HF's mean causal-LM loss through `module` (model, or its DDP / FSDP wrapper): the
    adapter gradients of the first backward, and every adapter parameter after the last step (plain tensors)."""
    params = [p for n, p in model.named_parameters() if _is_adapter(n)]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    first = None
    for _ in range(steps):
        with (pe.adapter_batch(module, mapping) if mapping else contextlib.nullcontext()):
            module(input_ids=ids, labels=ids).loss.backward()
        if first is None:
            first = _grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return first, {n: _full(p).detach().clone() for n, p in model.named_parameters() if _is_adapter(n)}


def _after_training(module, spec, ids, mapping):
    """What a user does after training: save the first adapter (through the wrapper) and serve under no_grad.
    {"saved": the file's tensors} or {"save_error": ...}, and {"logits": ...} or {"serve_error": ...}."""
    rec = {}
    with tempfile.TemporaryDirectory() as out:
        try:
            pe.save_adapter(module, spec["adapters"][0][0], out)
            from safetensors.torch import load_file
            rec["saved"] = load_file(os.path.join(out, "adapter_model.safetensors"))
        except Exception as e:      # noqa: BLE001 - recorded for the test
            rec["save_error"] = f"{type(e).__name__}: {e}"
            rec["save_traceback"] = traceback.format_exc()
    if "save_error" in rec and spec.get("wrap") == "fsdp2":
        # The workaround: every FSDP module unsharded (plain full Parameters registered) while saving.
        fsdp = [m for m in module.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
        with tempfile.TemporaryDirectory() as out:
            try:
                for m in fsdp:
                    m.unshard()
                pe.save_adapter(module, spec["adapters"][0][0], out)
                from safetensors.torch import load_file
                rec["saved_unsharded"] = load_file(os.path.join(out, "adapter_model.safetensors"))
            except Exception as e:  # noqa: BLE001
                rec["unsharded_save_error"] = f"{type(e).__name__}: {e}"
            finally:
                for m in fsdp:
                    m.reshard()
    try:
        with torch.no_grad(), (pe.adapter_batch(module, mapping) if mapping else contextlib.nullcontext()):
            rec["logits"] = module(input_ids=ids).logits.detach().clone()
    except Exception as e:          # noqa: BLE001
        rec["serve_error"] = f"{type(e).__name__}: {e}"
    return rec


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grads(model):
    return {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ the workers
def _scenario(rank, spec, group):
    if spec.get("backend"):
        os.environ["PTLM_BACKEND"] = spec["backend"]
    try:
        model = _setup(spec)
        ids, mapping = _batch(spec, rank)
        if spec.get("wrap") == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            module = model
        else:
            module = DDP(model, process_group=group, **spec.get("ddp", {}))
        grads, params = _train(module, model, ids, mapping)
        return {"grads": grads, "params": params, **_after_training(module, spec, ids, mapping)}
    finally:
        os.environ["PTLM_BACKEND"] = "reference"


def _scenario_unused_without_fup(rank, group):
    """b absent from rank 1's rows, find_unused_parameters=False: what DDP does with a plain model (rank 1 raises
    at the next forward, 'Expected to have finished reduction in the prior iteration'; rank 0 waits for rank 1's
    missing bucket until the group's timeout)."""
    spec = SPECS["mixed_lora"]
    model = _setup(spec)
    ids = _ids()[rank * ROWS:(rank + 1) * ROWS]
    mapping = [["a", "b"], ["a", "a"]][rank]
    ddp = DDP(model, process_group=group)
    events = []
    for step in range(2):
        try:
            with pe.adapter_batch(ddp, mapping):
                ddp(input_ids=ids, labels=ids).loss.backward()
            events.append(f"step {step}: ok")
        except Exception as e:      # noqa: BLE001 - recorded for the test
            events.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
            break
    return {"events": events}


def _plain_unused_without_fup(rank, group):
    """The same situation with a plain two-branch module: PyTorch's own behaviour, for comparison."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}).double()

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, use_b):
            return (self.m["a"](x) + (self.m["b"](x) if use_b else 0)).sum()

    ddp = DDP(Two(), process_group=group)
    events = []
    for step in range(2):
        try:
            ddp(torch.ones(2, 4, dtype=torch.float64), use_b=(rank == 0)).backward()
            events.append(f"step {step}: ok")
        except Exception as e:      # noqa: BLE001
            events.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
            break
    return {"events": events}


def _worker(rank, port, out_dir, names):
    torch.set_num_threads(1)
    os.environ["PTLM_BACKEND"] = "reference"
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            # A group per scenario, with a short timeout: a scenario that fails on one rank only (or the one that
            # is meant to leave a rank waiting) costs seconds, and the next scenario's new_group re-synchronizes.
            timeout = 2 if name.endswith("without_fup") else 30
            group = dist.new_group(ranks=list(range(WORLD)), timeout=datetime.timedelta(seconds=timeout))
            try:
                if name == "unused_without_fup":
                    results[name] = _scenario_unused_without_fup(rank, group)
                elif name == "plain_unused_without_fup":
                    results[name] = _plain_unused_without_fup(rank, group)
                elif name == "triton_mixed":
                    results[name] = _scenario(rank, TRITON_SPEC, group)
                else:
                    results[name] = _scenario(rank, SPECS[name], group)
            except Exception as e:  # noqa: BLE001 - recorded for the test
                results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            try:
                dist.barrier(group)
            except Exception:       # noqa: BLE001
                pass
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        try:
            dist.destroy_process_group()
        except Exception:           # noqa: BLE001
            pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_SCENARIOS = list(SPECS) + ["plain_unused_without_fup", "unused_without_fup"]


@pytest.fixture(scope="module")
def dist_results():
    """{scenario: [rank 0's record, rank 1's record]} from one pair of forked gloo workers."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return _run_distributed(DIST_SCENARIOS + (["triton_mixed"] if _triton_ok() else []))


def _run_distributed(names):
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(rank, port, out, names), daemon=True) for rank in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        got = []
        for rank in range(WORLD):
            path = os.path.join(out, f"rank{rank}.pt")
            assert os.path.exists(path), f"rank {rank} wrote no results (exit code {procs[rank].exitcode})"
            got.append(torch.load(path, weights_only=False))
    return {name: [got[r].get(name, {"error": "not run"}) for r in range(WORLD)] for name in names}


def _triton_ok():
    from tests.helpers import CUDA, INTERPRETED
    return INTERPRETED and not CUDA


# ------------------------------------------------------------------------------------------------ comparisons
def _reference(spec, extras=False):
    """The single-process run of the whole batch: first gradients and parameters after STEPS steps."""
    before = os.environ.get("PTLM_BACKEND")
    os.environ["PTLM_BACKEND"] = spec.get("backend", "reference")
    try:
        model = _setup(spec)
        ids, mapping = _batch(spec)
        grads, params = _train(model, model, ids, mapping)
        if extras:
            return grads, params, _after_training(model, spec, ids, mapping)
        return grads, params
    finally:
        if before is None:
            os.environ.pop("PTLM_BACKEND", None)
        else:
            os.environ["PTLM_BACKEND"] = before


def _close(got: dict, want: dict, rel: float, what: str):
    assert sorted(got) == sorted(want), f"{what}: only on one side: {sorted(set(got) ^ set(want))}"
    for n in want:
        err = (got[n].double() - want[n].double()).abs().max().item()
        scale = want[n].double().abs().max().item()
        assert err <= rel * max(scale, 1e-12), f"{what} {n}: off by {err:.3e} (max {scale:.3e})"


def _check_scenario(results, name, spec, rel=1e-9):
    ranks = results[name]
    for r, rec in enumerate(ranks):
        assert "error" not in rec, f"rank {r}: {rec.get('error')}\n{rec.get('traceback', '')}"
    want_grads, want_params = _reference(spec)
    assert want_grads, "the reference run trained nothing"
    for r, rec in enumerate(ranks):
        _close(rec["grads"], want_grads, rel, f"rank {r} gradient")
        _close(rec["params"], want_params, rel * 10, f"rank {r} parameters after {STEPS} steps")
    for n, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][n]), f"{n} differs across ranks after the optimizer steps"


def _check_after_training(results, name, spec, what, rel=1e-9):
    """what="save": saving the adapter through the wrapper writes the whole adapter (the single process's file);
    what="serve": serving each rank's rows under no_grad gives the single process's logits for those rows."""
    ranks = results[name]
    _, _, want = _reference(spec, extras=True)
    rows = spec.get("rows", ROWS)
    for r, rec in enumerate(ranks):
        assert "error" not in rec, f"rank {r}: {rec.get('error')}"
        if what == "save":
            assert "save_error" not in rec, f"rank {r}: {rec['save_error']}"
            _close(rec["saved"], want["saved"], rel * 10, f"rank {r} saved file")
        else:
            assert "serve_error" not in rec, f"rank {r}: {rec['serve_error']}"
            _close({"logits": rec["logits"]}, {"logits": want["logits"][r * rows:(r + 1) * rows]}, rel * 10,
                   f"rank {r} served")


AFTER = [n for n in SPECS if "frozen_at_wrap" not in n]


@pytest.mark.parametrize("name", AFTER)
def test_save_adapter_after_distributed_training(dist_results, name, reference_backend):
    """After DDP / FSDP2 training: pe.save_adapter(wrapper, ...) on each rank writes the full adapter, equal to the
    single-process run's file."""
    _check_after_training(dist_results, name, SPECS[name], "save")


@pytest.mark.parametrize("name", [n for n in AFTER if n.startswith("fsdp2")])
def test_fsdp2_save_adapter_works_with_every_module_unsharded(dist_results, name, reference_backend):
    """With FSDPModule.unshard() on every sharded module around it, save_adapter also writes the
    full adapter (the single process's file)."""
    _, _, want = _reference(SPECS[name], extras=True)
    for r, rec in enumerate(dist_results[name]):
        if "save_error" not in rec:
            continue
        assert "unsharded_save_error" not in rec, rec["unsharded_save_error"]
        _close(rec["saved_unsharded"], want["saved"], 1e-8, f"rank {r} unsharded save")


@pytest.mark.parametrize("name", AFTER)
def test_serve_after_distributed_training(dist_results, name, reference_backend):
    """After DDP / FSDP2 training, a no_grad forward through the wrapper (a mixed batch where the scenario has one)
    gives the single-process model's logits for the rank's rows."""
    _check_after_training(dist_results, name, SPECS[name], "serve")


@pytest.mark.parametrize("name", [n for n in SPECS if not n.startswith("fsdp2") and "frozen_at_wrap" not in n])
def test_ddp_gradients_equal_the_whole_batch(dist_results, name, reference_backend):
    """DDP over two gloo ranks: each rank's adapter gradients equal the single-process gradient of the whole batch
    (HF's mean loss), and after AdamW steps both ranks hold the same parameters (equal to the single process)."""
    _check_scenario(dist_results, name, SPECS[name])


@pytest.mark.parametrize("name", [n for n in SPECS if n.startswith("fsdp2")])
def test_fsdp2_gradients_equal_the_whole_batch(dist_results, name, reference_backend):
    """FSDP2 (fully_shard per decoder layer and the root) on the CPU over gloo: the unsharded adapter gradients
    equal the single process's, and so do the parameters after AdamW steps on the shards."""
    _check_scenario(dist_results, name, SPECS[name])


@needs_triton
def test_ddp_mixed_batch_on_the_triton_interpreter(dist_results):
    """Two LoRA adapters in a mixed batch under DDP with the Triton kernels (interpreter, float32, tiny)."""
    if "triton_mixed" not in dist_results:
        pytest.skip("Triton interpreter only (CPU)")
    _check_scenario(dist_results, "triton_mixed", TRITON_SPEC, rel=1e-4)


def test_ddp_unused_adapter_without_find_unused_parameters_behaves_as_pytorch(dist_results):
    """An adapter whose rows are all on rank 0, find_unused_parameters=False: the same outcome as a plain module
    with a branch unused on one rank (an error, no silent wrong gradient and no endless hang)."""
    plain = [rec.get("events", [rec.get("error")]) for rec in dist_results["plain_unused_without_fup"]]
    ours = [rec.get("events", [rec.get("error")]) for rec in dist_results["unused_without_fup"]]
    assert all(e and "ok" not in e[-1] for e in plain[1:]), plain
    for rank in range(WORLD):
        outcome = lambda events: [e.split(":")[0] + ":" + e.split(":")[1] if ":" in e else e for e in events]
        assert outcome(ours[rank]) == outcome(plain[rank]), (rank, ours[rank], plain[rank])
    assert any("Expected to have finished reduction" in e for e in ours[1]), ours[1]


def test_ddp_wrapped_before_the_second_adapter_is_trainable_does_not_average_it(dist_results, reference_backend):
    """Documents a pitfall (DDP's rule, not an engine error): DDP keeps the parameters that require grad when it is
    built. Wrapped after set_active_adapter("a"), a mixed batch (which makes b trainable inside the block) trains
    b on each rank from its own rows, never averaged: a's gradients are right, b's differ across ranks and the
    replicas drift apart silently. Make every adapter of the mixed batches trainable before wrapping."""
    ranks = dist_results["mixed_lora_b_frozen_at_wrap"]
    for r, rec in enumerate(ranks):
        assert "error" not in rec, f"rank {r}: {rec.get('error')}"
    want, _ = _reference(SPECS["mixed_lora"])
    b_names = [n for n in want if _owned(n, "b")]
    a_names = [n for n in want if _owned(n, "a")]
    assert b_names and a_names
    _close({n: ranks[0]["grads"][n] for n in a_names}, {n: want[n] for n in a_names}, 1e-9, "a")
    assert all(not torch.allclose(ranks[0]["grads"][n], ranks[1]["grads"][n]) for n in b_names)
    assert all(not torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in b_names)


# ------------------------------------------------------------------------------ gradient checkpointing (1 process)
def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _plain_and_checkpointed(model, run, reentrant):
    """run(model) -> loss, backward; the adapter gradients without and with HF gradient checkpointing."""
    twin = copy.deepcopy(model)
    run(model).backward()
    want = _grads(model)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        twin.enable_input_require_grads()          # as PEFT does: reentrant checkpoints need an input with grad
    run(twin).backward()
    assert twin.model.gradient_checkpointing if hasattr(twin, "model") else True
    return _grads(twin), want


GC_CASES = {
    "lora": (_llama, [("a", lambda: pe.LoraConfig(r=3, target_modules=["q_proj", "v_proj", "up_proj"]))], None),
    "gpt2_lora": (_gpt2, [("a", lambda: pe.LoraConfig(r=3, target_modules=["c_attn", "c_fc"]))], None),
    "bottleneck": (_llama, [("a", lambda: pe.BottleneckConfig(bottleneck=4, placement="pfeiffer"))], None),
    "prompt": (_llama, [("a", lambda: pe.PromptConfig(num_virtual_tokens=3))], None),
    "lora+bottleneck": (_llama, [("a", lambda: [pe.LoraConfig(r=2, target_modules=["k_proj"]),
                                                pe.BottleneckConfig(bottleneck=3, placement="parallel")])], None),
    "mixed": (_llama, [("a", LORA_QV), ("b", lambda: pe.BottleneckConfig(bottleneck=3)),
                       ("c", lambda: pe.PromptConfig(num_virtual_tokens=2))], ["a", "b", None, "c"]),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("case", list(GC_CASES))
def test_hf_gradient_checkpointing_gradients_equal_plain(case, reentrant, reference_backend):
    """model.gradient_checkpointing_enable (use_reentrant False / True + enable_input_require_grads): the adapter
    gradients equal the run without checkpointing (a mixed batch: backward inside the block)."""
    build, adapters, mapping = GC_CASES[case]
    model = _setup(dict(build=build, adapters=adapters, train=[n for n, _ in adapters]))
    ids = _ids(4, 5)

    def run(m):
        if mapping is None:
            return _lm_loss(m, ids)
        with pe.adapter_batch(m, mapping):
            loss = _lm_loss(m, ids)
            loss.backward()
        return loss.detach().requires_grad_()     # backward already ran inside the block

    got, want = _plain_and_checkpointed(model, run, reentrant)
    assert want
    _close(got, want, 1e-10, f"{case} checkpointed")


@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_tuning_refuses_gradient_checkpointing_by_name(reentrant, reference_backend):
    """Prefix tuning + gradient checkpointing is refused with a clear error (PEFT refuses it too), whether
    checkpointing is turned on after the adapter (at the training forward) or before (at add_adapter); no silent
    wrong gradient. Serving (no grad) with checkpointing on still works."""
    model = _setup(dict(build=_llama, adapters=[("a", lambda: pe.PrefixConfig(num_virtual_tokens=3))]))
    ids = _ids(2, 5)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        _lm_loss(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)
    fresh = _llama()
    fresh.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pe.add_adapter(fresh, "a", pe.PrefixConfig(num_virtual_tokens=3))


@needs_triton
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_triton_gradient_checkpointing_mixed_lora(monkeypatch, reentrant):
    """The Triton kernels (interpreter, float32, tiny): a mixed LoRA batch with HF gradient checkpointing gives the
    gradients of the run without it."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    model = _setup(TRITON_SPEC)
    ids = _ids(3, 3)

    def run(m):
        with pe.adapter_batch(m, ["a", "b", None]):
            loss = _lm_loss(m, ids)
            loss.backward()
        return loss.detach().requires_grad_()

    got, want = _plain_and_checkpointed(model, run, reentrant)
    assert any(_owned(n, "b") for n in want) and any(_owned(n, "a") for n in want)
    _close(got, want, 1e-5, "triton checkpointed")


# ------------------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_accumulation_over_micro_batches_of_different_mappings(checkpointing, reference_backend):
    """Three micro-batches accumulated into .grad: a mixed block ["a", "b"], then set_active_adapter("a") (which
    freezes b but must keep its accumulated gradient), then a block ["b", None]; each loss / 3. Equals one mixed
    batch of all six rows ["a", "b", "a", "a", "b", None] (HF's mean loss, equal token counts)."""
    spec = dict(build=_llama, adapters=[("a", LORA_QV), ("b", lambda: pe.LoraConfig(r=2, target_modules=["v_proj",
                                                                                                        "down_proj"]))],
                train=["a", "b"], checkpointing=checkpointing)
    model = _setup(spec)
    twin = copy.deepcopy(model)
    ids = _ids(6, 5)
    with pe.adapter_batch(model, ["a", "b"]):
        (_lm_loss(model, ids[0:2]) / 3).backward()
    pe.set_active_adapter(model, "a")
    (_lm_loss(model, ids[2:4]) / 3).backward()
    with pe.adapter_batch(model, ["b", None]):
        (_lm_loss(model, ids[4:6]) / 3).backward()
    got = _grads(model)
    with pe.adapter_batch(twin, ["a", "b", "a", "a", "b", None]):
        _lm_loss(twin, ids).backward()
    want = _grads(twin)
    assert any(_owned(n, "b") for n in want)
    _close(got, want, 1e-10, "accumulated")


# ------------------------------------------------------------------------------ torch.utils.checkpoint, plain block
class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self, checkpoint=None):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 4)
        self.checkpoint = checkpoint            # None, or use_reentrant

    def forward(self, x):
        for block in self.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.checkpoint)
        return self.head(x)


@pytest.mark.parametrize("mixed", [False, True], ids=["active", "mixed"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_torch_checkpoint_around_a_plain_block_with_lora(reentrant, mixed, reference_backend):
    """torch.utils.checkpoint around a plain PyTorch block whose Linears carry LoRA (one adapter active, or a mixed
    batch of two): the gradients of the run without checkpointing."""
    torch.manual_seed(0)
    net = _Net().double()
    pe.add_adapter(net, "a", pe.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    pe.add_adapter(net, "b", pe.LoraConfig(r=3, target_modules=["fc2"]))
    _randomize(net)
    pe.set_active_adapter(net, "a")
    net.train()
    x = torch.randn(4, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(4, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ckpt = copy.deepcopy(net)
    ckpt.checkpoint = reentrant

    def run(m):
        inp = x.clone().requires_grad_(reentrant)   # reentrant checkpoints need an input that requires grad
        with (pe.adapter_batch(m, ["a", "b", None, "b"]) if mixed else contextlib.nullcontext()):
            (m(inp) * w).sum().backward()
        return _grads(m)

    want = run(net)
    got = run(ckpt)
    assert any(_owned(n, "b") for n in want) == mixed
    _close({n: g for n, g in got.items()}, {n: g for n, g in want.items()}, 1e-10, "checkpointed block")
