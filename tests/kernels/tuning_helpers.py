"""Pieces shared by the autotuning tests (test_configs.py, test_tuned.py): a launcher's kernel that the "GPU"
refuses for one BLOCK_T, a config copied with other meta-parameters, and a checked lora_shrink call."""
import torch
import triton
from triton.runtime.errors import OutOfResources

from ptlm_engine.kernels import lora as K
from tests.helpers import DEVICE


def refusing(launcher, refused_block_t, tried):
    """The launcher's kernel, except that a config with BLOCK_T == refused_block_t is refused as Triton refuses a
    kernel over the GPU's shared memory (before launching anything); every tried BLOCK_T is appended to `tried`."""
    jit = launcher.autotuner.fn

    class Refusing:                        # launched as fn[grid](...) by TunedLauncher, fn.run(...) by Autotuner
        def run(self, *args, **kwargs):
            tried.append(kwargs["BLOCK_T"])
            if kwargs["BLOCK_T"] == refused_block_t:
                raise OutOfResources(294912, 232448, "shared memory")
            return jit.run(*args, **kwargs)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)
    return Refusing()


def config_like(config, **meta):
    return triton.Config({**config.kwargs, **meta}, num_warps=config.num_warps, num_stages=config.num_stages,
                         pre_hook=config.pre_hook)


def shrink_call():
    x = torch.randn(37, 40, device=DEVICE)
    a = torch.randn(5, 40, device=DEVICE)
    torch.testing.assert_close(K.lora_shrink(x, a, 0.5), 0.5 * x @ a.T, rtol=1e-4, atol=1e-4)
