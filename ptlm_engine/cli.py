"""The `ptlm` command (also `python -m ptlm_engine`): `demo` (the default) and `bench`."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import ptlm_engine
from ptlm_engine import demo


def bench(argv: list[str]) -> int:
    """Forward argv to bench.gpu_suite. bench/ lives beside the package in the repository and is not
    installed with it, so it is imported from the current directory, which must be a checkout."""
    checkout = Path.cwd()
    if not (checkout / "bench" / "gpu_suite.py").is_file():
        print(f"ptlm bench: no bench/gpu_suite.py in {checkout}. The benchmarks are not part of the installed "
              "package: run `ptlm bench` from the root of a ptlm_engine checkout.", file=sys.stderr)
        return 2
    # The `ptlm` script's sys.path starts with its own bin directory, not the current one.
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    importlib.import_module("bench.gpu_suite").main(argv)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptlm", description="ptlm_engine: fused-kernel LoRA for PyTorch and "
                                "Hugging Face models. Without a command: the demo.")
    p.add_argument("--version", action="version", version=f"ptlm_engine {ptlm_engine.__version__}")
    commands = p.add_subparsers(dest="command", metavar="{demo,bench}")
    demo_parser = commands.add_parser("demo", help="train, save and reload a LoRA adapter on a tiny random "
                                      "Llama and compare the outputs (seconds on a CPU)")
    demo.add_arguments(demo_parser)
    # add_help=False: `ptlm bench --help` shows the suite's own options.
    commands.add_parser("bench", add_help=False, help="the GPU benchmark suite, bench/gpu_suite.py (from a "
                        "checkout); arguments go to it unchanged")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args, rest = p.parse_known_args(argv or ["demo"])
    if args.command == "bench":
        return bench(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return demo.run(args.steps, args.out, args.device)
