"""The `ptlm` command: the default command (the demo), `python -m ptlm_engine --help`, and `bench` inside and
outside a checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptlm_engine import cli, demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


def test_no_command_runs_the_demo_with_its_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run", lambda *args: calls.append(args) or 0)
    assert cli.main([]) == 0
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert calls == [(demo.DEFAULT_STEPS, None, default_device)]


def test_module_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "ptlm_engine", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and "bench" in done.stdout


def test_bench_outside_a_checkout_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--smoke", "out"]) == 2
    assert "run `ptlm bench` from the root of a ptlm_engine checkout" in capsys.readouterr().err


def test_bench_forwards_its_arguments_to_the_suite(monkeypatch):
    monkeypatch.chdir(REPO)
    from bench import gpu_suite
    received = []
    monkeypatch.setattr(gpu_suite, "main", received.append)
    assert cli.main(["bench", "OUT", "--smoke", "--budget-s", "5"]) == 0
    assert received == [["OUT", "--smoke", "--budget-s", "5"]]
