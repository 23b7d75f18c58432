"""Autotuner choices kept across processes: each TunedLauncher's chosen config per key, as JSON.

A tuning run on one card saves them (`save_tuned`, bench.gpu_suite's tuned.json); a later run on the same card
loads them (`load_tuned`, or PTLM_TUNED=FILE before the kernels are imported), and each key then compiles its
chosen config alone instead of benchmarking every candidate: the difference between seconds and minutes of
first calls on a fresh machine. Keys are the launchers' own cache keys (shape buckets, flags, dtypes) as text;
a saved config the launcher no longer offers is ignored and that key tunes again.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import triton

LAUNCHERS: list = []                           # every TunedLauncher, in construction order
PRESETS: dict[str, dict[str, dict]] = {}       # kernel name -> key text -> config kwargs (num_warps, ... too)


def key_text(key: tuple) -> str:
    """The key as text: ints, bools, None and torch dtypes all have a stable repr."""
    return repr(key)


def preset(name: str, key: tuple, offered: list) -> tuple[dict, object] | None:
    """(config kwargs, pre_hook) loaded for kernel `name` at `key`, if it is among the `offered` configs."""
    meta = PRESETS.get(name, {}).get(key_text(key))
    if meta is None:
        return None
    return next(((meta, config.pre_hook) for config in offered if config.all_kwargs() == meta), None)


def save_tuned(path: str | Path, card: str) -> int:
    """Write every choice made in this process, over those loaded before; returns the number of entries."""
    kernels = {name: dict(entries) for name, entries in PRESETS.items()}
    for launcher in LAUNCHERS:
        for key, (meta, _pre_hook) in launcher.configs.items():
            kernels.setdefault(launcher.name, {})[key_text(key)] = meta
    Path(path).write_text(json.dumps({"card": card, "triton": triton.__version__, "kernels": kernels}, indent=1,
                                     sort_keys=True))
    return sum(map(len, kernels.values()))


def load_tuned(path: str | Path, card: str | None = None) -> int:
    """Load choices saved by `save_tuned`; returns the number of entries (0, with a warning, when `card` is
    given and the file was written on another card)."""
    data = json.loads(Path(path).read_text())
    if card is not None and data.get("card") != card:
        warnings.warn(f"{path}: tuned on {data.get('card')!r}, not on {card!r}; not loaded", stacklevel=2)
        return 0
    for name, entries in data["kernels"].items():
        PRESETS.setdefault(name, {}).update(entries)
    return sum(map(len, data["kernels"].values()))


if os.environ.get("PTLM_TUNED"):
    load_tuned(os.environ["PTLM_TUNED"])
