"""Autotuner choices kept across processes: each TunedLauncher's chosen config per key, as JSON.

Tuning every kernel of a training step costs minutes on a fresh machine (335 s for the Llama-shaped step on an
H100); a key whose choice is known compiles that config alone. Choices come, per card (its CUDA device name),
from three places, later ones over earlier:
- the package: `tuned_configs/<card>.json` beside this file, the choices of the project's benchmark runs on that card;
  a card without a file of its own takes the file of a card of the same architecture (compute capability and
  multiprocessor count, each file's "arch"): an H200 runs the H100's choices (the same Hopper SMs, 132 of them,
  with faster memory) instead of tuning every key from scratch, which took minutes of a GPU session
  (PTLM_TUNED_SIBLINGS=0 turns that off);
- this machine's cache, `$PTLM_TUNED_CACHE/<card>.json` (default ~/.cache/ptlm_engine/tuned; PTLM_TUNED_CACHE=0
  turns it off): every key tuned here is added to it as soon as it is tuned;
- PTLM_TUNED=FILE (read at import) or `load_tuned(FILE)`: a run's saved choices (`save_tuned`, bench.gpu_suite's
  tuned.json), applied again over the card's files when those load (lazily, at the first launch on the card),
  and only where the file was written on that card.
Keys are the launchers' own cache keys (shape buckets, flags, dtypes) as text; a saved config the launcher no
longer offers is ignored and that key tunes again. A file that does not parse or has another shape is passed over
with a warning, and the cache's is replaced by the next choice tuned. The choices loaded are the process's, not
per card: a process driving two kinds of GPU gets the first card's for both (not handled).
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
import warnings
from pathlib import Path

import torch
import triton

LAUNCHERS: list = []                           # every TunedLauncher, in construction order
PRESETS: dict[str, dict[str, dict]] = {}       # kernel name -> key text -> config kwargs (num_warps, ... too)
PACKAGED = Path(__file__).with_name("tuned_configs")   # <card>.json per card the project has tuned on
_cards_loaded: set[str] = set()
SOURCES: dict[str, list[str]] = {}             # card -> the files its choices were loaded from, in order
_explicit: list[tuple[Path, dict]] = []       # load_tuned(path) without a card: applied again over each card's files


def key_text(key: tuple) -> str:
    """The key as text: ints, bools, None and torch dtypes all have a stable repr."""
    return repr(key)


def preset(name: str, key: tuple, offered: list) -> tuple[dict, object] | None:
    """(config kwargs, pre_hook) loaded for kernel `name` at `key`, if it is among the `offered` configs."""
    card = current_card()
    if card is not None and card not in _cards_loaded:
        load_card(card)
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
    Path(path).write_text(json.dumps({"card": card, "arch": current_arch(), "triton": triton.__version__,
                                      "kernels": kernels}, indent=1, sort_keys=True))
    return sum(map(len, kernels.values()))


def _read(path: Path) -> dict:
    """A tuned-choices file's content: {"card": ..., "kernels": {kernel: {key text: config kwargs}}}; ValueError
    if it does not parse or has another shape."""
    data = json.loads(path.read_text())
    kernels = data.get("kernels") if isinstance(data, dict) else None
    if not (isinstance(kernels, dict) and all(isinstance(entries, dict) and all(isinstance(m, dict)
                                                                                 for m in entries.values())
                                              for entries in kernels.values())):
        raise ValueError("not a tuned-choices file ({'card': ..., 'kernels': {kernel: {key: config}}})")
    return data


def _merge(data: dict) -> int:
    for name, entries in data["kernels"].items():
        PRESETS.setdefault(name, {}).update(entries)
    return sum(map(len, data["kernels"].values()))


def load_tuned(path: str | Path, card: str | None = None) -> int:
    """Load choices saved by `save_tuned`; returns the number of entries (0, with a warning, when `card` is
    given and the file was written on another card). Without `card` the file also goes over each card's files
    when they load, where it was written on that card (the docstring's order)."""
    path = Path(path)
    data = _read(path)
    if card is not None and data.get("card") != card:
        warnings.warn(f"{path}: tuned on {data.get('card')!r}, not on {card!r}; not loaded", stacklevel=2)
        return 0
    if card is None:
        _explicit.append((path, data))
    return _merge(data)


def forget(name: str, key: tuple) -> bool:
    """Drop a loaded choice (the GPU refused it); False if there was none."""
    return PRESETS.get(name, {}).pop(key_text(key), None) is not None


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def current_card() -> str | None:
    """The current CUDA device's name; None without CUDA, and under Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return None
    return _device_name(torch.cuda.current_device())


def current_arch() -> dict | None:
    """What decides whether one card's choices fit another: {"capability": "9.0", "multiprocessors": 132} for the
    current CUDA device; None where current_card is None."""
    if current_card() is None or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}


def sibling_file(arch: dict | None) -> Path | None:
    """The package's file of a card with this architecture (the first by name), if any."""
    if arch is None or os.environ.get("PTLM_TUNED_SIBLINGS", "1") == "0":
        return None
    for path in sorted(PACKAGED.glob("*.json")):
        try:
            if _read(path).get("arch") == arch:
                return path
        except (OSError, ValueError):
            continue
    return None


def card_file(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3.json'."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") + ".json"


def cache_dir() -> Path | None:
    """This machine's cache of tuned choices; None when PTLM_TUNED_CACHE=0."""
    setting = os.environ.get("PTLM_TUNED_CACHE", "")
    if setting == "0":
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptlm_engine" / "tuned"


def load_card(card: str) -> int:
    """Once per card and process: the package's choices for it, then this machine's cache over them."""
    _cards_loaded.add(card)
    loaded = 0
    root = cache_dir()
    package = PACKAGED / card_file(card)
    sibling = None if package.is_file() else sibling_file(current_arch())
    for path in (sibling or package, None if root is None else root / card_file(card)):
        if path is None or not path.is_file():
            continue
        try:
            # a sibling's file names its own card: merged as this card's (load_tuned would refuse it)
            loaded += _merge(_read(path)) if path == sibling else load_tuned(path, card)
            SOURCES.setdefault(card, []).append(str(path))
        except (OSError, ValueError) as e:   # a torn or foreign file: tune as if it were not there
            warnings.warn(f"{path}: not loaded ({type(e).__name__}: {e})", stacklevel=2)
    for path, data in _explicit:                      # PTLM_TUNED / load_tuned(FILE): over the card's files
        if data.get("card") in (None, card):
            loaded += _merge(data)
        else:
            warnings.warn(f"{path}: tuned on {data.get('card')!r}, not on {card!r}; not applied over its choices",
                          stacklevel=2)
    return loaded


def remember(name: str, key: tuple, meta: dict) -> None:
    """Add one choice tuned in this process to this machine's cache for the current card (read, merge, then an
    atomic replace: processes tuning side by side lose at most each other's last entry, never the file)."""
    card, root = current_card(), cache_dir()
    if card is None or root is None:
        return
    path = root / card_file(card)
    try:
        root.mkdir(parents=True, exist_ok=True)
        try:
            data = _read(path)
        except (OSError, ValueError):    # none yet, or torn / foreign: replaced by this one
            data = {}
        if data.get("card") != card:
            data = {"card": card, "kernels": {}}
        data["triton"], data["arch"] = triton.__version__, current_arch()
        data["kernels"].setdefault(name, {})[key_text(key)] = meta
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")   # one per writer, then atomic
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: tuned choice not cached ({type(e).__name__}: {e})", stacklevel=2)


if os.environ.get("PTLM_TUNED"):
    load_tuned(os.environ["PTLM_TUNED"])
