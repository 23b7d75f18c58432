"""TunedLauncher (kernels/configs.py): without autotuning a new key launches the first config that fits, a
loaded choice the GPU refuses is forgotten and replaced by one of the same split factors, and a new key's
candidate configs compile side by side before tuning."""
import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from ptlm_engine.kernels import configs
from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import tuned
from tests.helpers import DEVICE
from tests.kernels.tuning_helpers import config_like, shrink_call

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or K.INTERPRETED),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def test_without_autotuning_a_new_key_launches_the_first_config_that_fits(shrink, monkeypatch):
    """PTLM_AUTOTUNE=0: a config the GPU refuses is passed over for the next one, and the key keeps the one
    that ran."""
    launcher, too_big, fits, tried = shrink
    monkeypatch.setattr(configs, "AUTOTUNE", False)
    shrink_call()
    assert tried == [too_big.kwargs["BLOCK_T"], fits.kwargs["BLOCK_T"]]
    assert [meta["BLOCK_T"] for meta, _ in launcher.configs.values()] == [fits.kwargs["BLOCK_T"]]
    shrink_call()                                                  # the key's choice launches directly
    assert tried[-1] == fits.kwargs["BLOCK_T"] and len(tried) == 3


def test_a_loaded_choice_the_gpu_refuses_is_forgotten_and_chosen_again(shrink, monkeypatch):
    launcher, too_big, fits, tried = shrink
    monkeypatch.setattr(configs, "AUTOTUNE", False)
    key = (64, 40, 5, False, torch.float32, torch.float32)
    monkeypatch.setattr(tuned, "PRESETS", {launcher.name: {tuned.key_text(key): too_big.all_kwargs()}})
    shrink_call()
    assert tried == [too_big.kwargs["BLOCK_T"]] * 2 + [fits.kwargs["BLOCK_T"]]   # the preset, then the fallback
    assert tuned.PRESETS[launcher.name] == {}
    assert launcher.configs[key][0] == fits.all_kwargs()


def test_a_new_key_compiles_its_candidate_configs_side_by_side_before_tuning(monkeypatch):
    """_precompile warms every pruned config up inside one Triton AsyncCompileMode; a TMA config's pre_hook sets
    block shapes on copies of the descriptors (aliased as the originals), never on the originals."""
    import triton.language as tl
    from triton.runtime import _async_compile
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def kernel(a_desc, b_desc, n, BLOCK: tl.constexpr):
        pass

    def block_shapes(nargs):
        nargs["a_desc"].block_shape = [nargs["BLOCK"], 8]
        nargs["b_desc"].block_shape = [nargs["BLOCK"], 16]

    configs_ = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2, pre_hook=block_shapes) for b in (16, 32, 64)]
    launcher = configs.TunedLauncher(triton.autotune(
        configs_, key=["n"], prune_configs_by={"early_config_prune": lambda cs, nargs, **kw: cs[1:]})(kernel))
    tuned.LAUNCHERS.remove(launcher)
    warmed = []

    class Recording:
        def warmup(self, a_desc, b_desc, n, grid, **kwargs):
            assert _async_compile.active_mode.get() is not None
            warmed.append((kwargs["BLOCK"], list(a_desc.block_shape), list(b_desc.block_shape), a_desc is b_desc,
                           a_desc is shared))
    monkeypatch.setattr(launcher.autotuner, "fn", Recording())
    monkeypatch.setattr(configs, "INTERPRETED", False)
    t = torch.zeros(64, 64)
    shared = TensorDescriptor.from_tensor(t, [1, 1])
    launcher._precompile((shared, shared, 7), {})
    assert warmed == [(32, [32, 16], [32, 16], True, False), (64, [64, 16], [64, 16], True, False)]
    assert shared.block_shape == [1, 1]
    assert _async_compile.active_mode.get() is None


def _refusing_where(launcher, refuse):
    """The launcher's kernel, except that a config for which refuse(meta) holds is refused as Triton refuses a
    kernel over the GPU's shared memory (before launching anything)."""
    jit = launcher.autotuner.fn

    class Refusing:                        # launched as fn[grid](...) by TunedLauncher, fn.run(...) by Autotuner
        def run(self, *args, **kwargs):
            if refuse(kwargs):
                raise OutOfResources(294912, 232448, "shared memory")
            return jit.run(*args, **kwargs)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)
    return Refusing()


@pytest.mark.parametrize("autotune", [False, True])
def test_a_refused_preset_falls_back_only_to_its_split_factors(monkeypatch, autotune):
    """A loaded choice the GPU refuses is forgotten; the launch then takes only a config of the same split factors
    (the caller sized its workspaces and zeroed outputs for them), untimed. None here: a clear error, and the next
    call chooses afresh. (It used to launch SPLIT_K=2 into the (y, y) workspace made for SPLIT_K=1: a wrong y.)"""
    launcher = K._lora_decode
    split = launcher.autotuner.configs[0]                         # the interpreter's one config: SPLIT_K=2
    assert split.kwargs["SPLIT_K"] > 1
    unsplit = config_like(split, SPLIT_K=1)
    monkeypatch.setattr(launcher, "configs", {})
    monkeypatch.setattr(launcher.autotuner, "configs", [unsplit, split])
    monkeypatch.setattr(launcher.autotuner, "cache", {})
    monkeypatch.setattr(launcher.autotuner, "do_bench", lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1])
    monkeypatch.setattr(launcher.autotuner, "fn", _refusing_where(launcher, lambda meta: meta["SPLIT_K"] == 1))
    monkeypatch.setattr(configs, "AUTOTUNE", autotune)
    monkeypatch.setattr(tuned, "remember", lambda *args: None)
    M, N, Kd, R = 8, 32, 64, 4
    key = (8, N, Kd, R, True, False, False, True, False) + (torch.float32,) * 4
    monkeypatch.setattr(tuned, "PRESETS", {launcher.name: {tuned.key_text(key): unsplit.all_kwargs()}})
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, Kd, generator=gen), torch.randn(N, Kd, generator=gen)
    a, b = torch.randn(R, Kd, generator=gen), torch.randn(N, R, generator=gen)
    x, w, a, b = (t.to(DEVICE) for t in (x, w, a, b))
    # y at the start of a larger buffer: what the fallback writes past y's end (2 splits of M (N + R) fp32
    # partials into a workspace of M N elements) lands there instead of past the allocation.
    buffer = torch.zeros(8 * M * (N + R), device=DEVICE)
    with pytest.raises(RuntimeError, match="does not fit this GPU / Triton .* nor does another config with its "
                                           "splits {'SPLIT_K': 1}; the choice is forgotten"):
        K.lora_matmul(x, w, a, b, 0.5, None, fuse_shrink=True, out=buffer[:M * N].view(M, N))
    assert tuned.PRESETS[launcher.name] == {}
    y, _ = K.lora_matmul(x, w, a, b, 0.5, None, fuse_shrink=True)
    torch.testing.assert_close(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, rtol=1e-4, atol=1e-4)
