"""Autotuner choices saved by one process and loaded by another: the loaded key launches without tuning."""
import json

import pytest
import torch
import triton

from ptlm_engine.kernels import configs
from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import tuned
from tests.kernels.tuning_helpers import config_like, shrink_call

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or K.INTERPRETED),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CARD = "Card A 80GB"
CARD_FILE = "card-a-80gb.json"
SHRINK_KEY = (64, 40, 5, False, torch.float32, torch.float32)     # lora_shrink's key for x (37, 40), A (5, 40)


def test_saved_choices_load_and_launch_without_tuning(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "PRESETS", {})
    launcher = K._lora_shrink
    monkeypatch.setattr(launcher, "configs", {})
    x = torch.randn(37, 40, device=DEVICE)
    a = torch.randn(5, 40, device=DEVICE)
    expected = K.lora_shrink(x, a, 0.5)                             # tunes this key (one candidate when interpreted)
    chosen = dict(launcher.configs)
    assert len(chosen) == 1
    path = tmp_path / "tuned.json"
    assert tuned.save_tuned(path, "card A") >= 1
    data = json.loads(path.read_text())
    assert data["card"] == "card A" and list(data["kernels"]["_lora_shrink_kernel"].values()) == \
        [meta for meta, _ in chosen.values()]

    launcher.configs.clear()
    with pytest.warns(UserWarning, match="tuned on 'card A', not on 'card B'"):
        assert tuned.load_tuned(path, card="card B") == 0
    assert tuned.load_tuned(path, card="card A") >= 1

    def no_tuning(*args, **kwargs):
        raise AssertionError("the loaded key tuned again")
    monkeypatch.setattr(launcher.autotuner, "run", no_tuning)
    torch.testing.assert_close(K.lora_shrink(x, a, 0.5), expected)
    assert launcher.configs == chosen


def test_a_choice_no_longer_offered_tunes_again(monkeypatch):
    launcher = K._lora_shrink
    key = (64, 40, 5, False, torch.float32, torch.float32)
    monkeypatch.setattr(tuned, "PRESETS", {launcher.name: {tuned.key_text(key): {"BLOCK_T": 3, "num_warps": 1}}})
    assert tuned.preset(launcher.name, key, launcher.autotuner.configs) is None
    offered = launcher.autotuner.configs[0]
    monkeypatch.setattr(tuned, "PRESETS", {launcher.name: {tuned.key_text(key): offered.all_kwargs()}})
    assert tuned.preset(launcher.name, key, launcher.autotuner.configs) == (offered.all_kwargs(), offered.pre_hook)


def test_a_tuned_choice_is_cached_for_the_card_and_loaded_by_the_next_process(shrink, monkeypatch, tmp_path):
    """A key tuned here goes into $PTLM_TUNED_CACHE/<card>.json at once; a later process loads the package's
    choices for the card, then the cache's over them, and launches the key without tuning."""
    launcher, too_big, fits, tried = shrink
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    monkeypatch.setenv("PTLM_TUNED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuned, "current_card", lambda: "Card A 80GB")
    monkeypatch.setattr(tuned, "_cards_loaded", {"Card A 80GB"})      # this process loaded its (empty) files
    monkeypatch.setattr(launcher.autotuner, "cache", {})
    monkeypatch.setattr(launcher.autotuner, "do_bench", lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1])
    shrink_call()                                                  # tunes: too_big refused (inf), fits chosen
    key = (64, 40, 5, False, torch.float32, torch.float32)
    cached = json.loads((tmp_path / "cache" / "card-a-80gb.json").read_text())
    assert cached["card"] == "Card A 80GB"
    assert cached["kernels"][launcher.name] == {tuned.key_text(key): fits.all_kwargs()}

    # The next process: the package offers too_big for this key and another key; the cache's choice wins.
    package = tmp_path / "package"
    package.mkdir()
    other = tuned.key_text((128, 40, 5, False, torch.float32, torch.float32))
    (package / "card-a-80gb.json").write_text(json.dumps({"card": "Card A 80GB", "kernels": {launcher.name: {
        tuned.key_text(key): too_big.all_kwargs(), other: too_big.all_kwargs()}}}))
    monkeypatch.setattr(tuned, "PACKAGED", package)
    monkeypatch.setattr(tuned, "PRESETS", {})
    monkeypatch.setattr(tuned, "_cards_loaded", set())
    launcher.configs.clear()
    monkeypatch.setattr(launcher.autotuner, "run", lambda *a, **k: pytest.fail("a cached key tuned again"))
    tried.clear()
    shrink_call()
    assert tried == [fits.kwargs["BLOCK_T"]]
    assert tuned.PRESETS[launcher.name][other] == too_big.all_kwargs()


def test_the_tuned_cache_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("PTLM_TUNED_CACHE", "0")
    monkeypatch.setattr(tuned, "current_card", lambda: "Card A")
    assert tuned.cache_dir() is None
    tuned.remember("k", (1,), {"num_warps": 4})                    # nothing to write, nothing raised
    monkeypatch.setenv("PTLM_TUNED_CACHE", str(tmp_path))
    tuned.remember("k", (1,), {"num_warps": 4})
    tuned.remember("k", (2,), {"num_warps": 8})
    assert json.loads((tmp_path / "card-a.json").read_text())["kernels"] == {"k": {"(1,)": {"num_warps": 4},
                                                                                   "(2,)": {"num_warps": 8}}}


def test_a_torn_cache_file_is_passed_over_with_a_warning(monkeypatch, tmp_path):
    """Another process's write cut short (or a foreign file) leaves the card's keys to tune, never a failure."""
    monkeypatch.setenv("PTLM_TUNED_CACHE", str(tmp_path))
    monkeypatch.setattr(tuned, "PACKAGED", tmp_path / "no package")
    monkeypatch.setattr(tuned, "PRESETS", {})
    monkeypatch.setattr(tuned, "_cards_loaded", set())
    (tmp_path / "card-a.json").write_text('{"card": "Card A", "kernels": {"k": {"(1,)": {"num_wa')
    with pytest.warns(UserWarning, match="not loaded"):
        assert tuned.load_card("Card A") == 0
    assert tuned.PRESETS == {} and "Card A" in tuned._cards_loaded


# ------------------------------------------------------------------ files of another shape, precedence
@pytest.fixture
def card_a(monkeypatch, tmp_path):
    """A process on card CARD with an empty package dir and its own cache dir; nothing loaded yet."""
    monkeypatch.setenv("PTLM_TUNED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuned, "PACKAGED", tmp_path / "package")
    monkeypatch.setattr(tuned, "PRESETS", {})
    monkeypatch.setattr(tuned, "_cards_loaded", set())
    monkeypatch.setattr(tuned, "_explicit", [])
    monkeypatch.setattr(tuned, "SOURCES", {})
    monkeypatch.setattr(tuned, "current_card", lambda: CARD)
    (tmp_path / "cache").mkdir()
    (tmp_path / "package").mkdir()
    return tmp_path


@pytest.fixture
def tuning_shrink(monkeypatch):
    """K._lora_shrink with no choices made, offering two configs (so a new key tunes and is remembered)."""
    launcher = K._lora_shrink
    base = launcher.autotuner.configs[0]
    other = config_like(base, BLOCK_T=2 * base.kwargs["BLOCK_T"])
    monkeypatch.setattr(launcher, "configs", {})
    monkeypatch.setattr(launcher.autotuner, "configs", [base, other])
    monkeypatch.setattr(launcher.autotuner, "cache", {})
    monkeypatch.setattr(launcher.autotuner, "do_bench", lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1])
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    return launcher


def _offered():
    """Two configs a launcher offers, and their metas."""
    a = triton.Config({"BLOCK": 16}, num_warps=4, num_stages=2)
    b = triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2)
    return [a, b], a.all_kwargs(), b.all_kwargs()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("content", ["[]", "null", '{"card": "Card A 80GB", "kernels": null}',
                                     '{"card": "Card A 80GB", "kernels": {"_lora_shrink_kernel": [1]}}',
                                     '{"card": "Card A 80GB"}'])
def test_a_foreign_but_well_formed_cache_file_does_not_crash_an_op(card_a, tuning_shrink, content):
    """A cache file that is valid JSON of another shape (a list, null, no or a null "kernels", entries that are
    not objects: another tool's or version's) is passed over on load and replaced by the next choice tuned (it
    used to raise out of the first launch of the process, or out of the launch tuning a new key)."""
    (card_a / "cache" / CARD_FILE).write_text(content)
    shrink_call()
    cached = json.loads((card_a / "cache" / CARD_FILE).read_text())
    assert tuned.key_text(SHRINK_KEY) in cached["kernels"][tuning_shrink.name]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_torn_cache_file_is_rewritten_by_the_next_tuned_key(card_a, tuning_shrink):
    """A torn file (a writer killed, a full disk) is skipped on load and replaced by the next choice tuned (the
    cache used to stay dead: remember refused to write over a file that does not parse)."""
    (card_a / "cache" / CARD_FILE).write_text('{"card": "Card A 80GB", "kernels": {"k": {"(1,)": {"num_wa')
    shrink_call()
    cached = json.loads((card_a / "cache" / CARD_FILE).read_text())
    assert tuned.key_text(SHRINK_KEY) in cached["kernels"][tuning_shrink.name]


def test_ptlm_tuned_file_wins_over_the_package_and_the_cache(card_a):
    """Package, then cache, then PTLM_TUNED=FILE / load_tuned(FILE): the explicit file is read before the card's
    files load (lazily, at the first launch) and goes over them again then; a file of another card does not."""
    offered, meta_a, meta_b = _offered()
    key = (64, 40, 5)
    (card_a / "package" / CARD_FILE).write_text(json.dumps(
        {"card": CARD, "kernels": {"kern": {tuned.key_text(key): meta_a}}}))
    run = card_a / "tuned.json"
    run.write_text(json.dumps({"card": CARD, "kernels": {"kern": {tuned.key_text(key): meta_b}}}))
    tuned.load_tuned(run)                                                 # what PTLM_TUNED=run does at import
    assert tuned.preset("kern", key, offered) == (meta_b, None)
    other = card_a / "other.json"
    other.write_text(json.dumps({"card": "Card B", "kernels": {"kern": {tuned.key_text(key): meta_a}}}))
    tuned.load_tuned(other)
    tuned._cards_loaded.clear()
    with pytest.warns(UserWarning, match="tuned on 'Card B', not on 'Card A 80GB'; not applied"):
        tuned.preset("kern", key, offered)




# ------------------------------------------------------------------ a card without a file: its architecture's
HOPPER_132 = {"capability": "9.0", "multiprocessors": 132}


def test_a_card_without_a_file_takes_a_file_of_its_architecture(card_a, monkeypatch):
    """An H200 (no file of its own) runs the H100's packaged choices, the same SMs; a card of another
    architecture does not, nor any card with PTLM_TUNED_SIBLINGS=0; the machine's cache of the card itself still
    goes over them, and SOURCES says where the choices came from."""
    offered, meta_a, meta_b = _offered()
    key, other = (64, 40, 5), (128, 40, 5)
    sibling = card_a / "package" / "card-b.json"
    sibling.write_text(json.dumps({"card": "Card B", "arch": HOPPER_132, "kernels": {"kern": {
        tuned.key_text(key): meta_a, tuned.key_text(other): meta_a}}}))
    (card_a / "package" / "card-c.json").write_text(json.dumps(
        {"card": "Card C", "arch": {"capability": "8.0", "multiprocessors": 108},
         "kernels": {"kern": {tuned.key_text(key): meta_b}}}))
    (card_a / "cache" / CARD_FILE).write_text(json.dumps(
        {"card": CARD, "kernels": {"kern": {tuned.key_text(other): meta_b}}}))
    monkeypatch.setattr(tuned, "current_arch", lambda: HOPPER_132)
    assert tuned.preset("kern", key, offered) == (meta_a, None)
    assert tuned.preset("kern", other, offered) == (meta_b, None)          # the card's own cache over it
    assert tuned.SOURCES[CARD] == [str(sibling), str(card_a / "cache" / CARD_FILE)]

    for arch, siblings in (({"capability": "9.0", "multiprocessors": 114}, "1"), (HOPPER_132, "0")):
        monkeypatch.setattr(tuned, "current_arch", lambda: arch)
        monkeypatch.setenv("PTLM_TUNED_SIBLINGS", siblings)
        monkeypatch.setattr(tuned, "PRESETS", {})
        tuned._cards_loaded.clear()
        assert tuned.preset("kern", key, offered) is None


def test_a_card_with_its_own_file_never_takes_a_sibling(card_a, monkeypatch):
    offered, meta_a, meta_b = _offered()
    key = (64, 40, 5)
    (card_a / "package" / "card-b.json").write_text(json.dumps(
        {"card": "Card B", "arch": HOPPER_132, "kernels": {"kern": {tuned.key_text(key): meta_a}}}))
    (card_a / "package" / CARD_FILE).write_text(json.dumps({"card": CARD, "arch": HOPPER_132, "kernels": {}}))
    monkeypatch.setattr(tuned, "current_arch", lambda: HOPPER_132)
    assert tuned.preset("kern", key, offered) is None


def test_the_packaged_files_name_their_architecture():
    """Every packaged file says what it fits (the sibling lookup reads it), and saved files carry it too."""
    files = sorted(tuned.PACKAGED.glob("*.json"))
    assert files
    for path in files:
        arch = json.loads(path.read_text())["arch"]
        assert set(arch) == {"capability", "multiprocessors"} and isinstance(arch["multiprocessors"], int)
