"""Regenerate the markdown table and the PNG plot of a results JSON written by any bench script.

    python -m bench.report RESULTS.json [--out DIR]     # writes RESULTS.md and RESULTS.png (beside it by default)

The plot has one panel per layer shape and mode for every op whose rows sweep T (at least 3 values): median ms
against T on log-log axes, one line per provider, CUDA-graph timings dashed. Without matplotlib the plot is
skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench import harness

MIN_POINTS = 3


def _panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(op, fixed shape fields, mode) -> its rows, for sweeps over T with enough points to draw."""
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        if "T" not in r or r.get("ms") is None or r["provider"] == "-":
            continue
        fixed = tuple((k, v) for k, v in r.items() if k not in harness.LEAD_COLUMNS + harness.METRIC_COLUMNS
                      and k not in ("T", "gbps", "tflops"))
        panels.setdefault((r["op"], fixed, r["mode"]), []).append(r)
    return {k: v for k, v in panels.items() if len({r["T"] for r in v}) >= MIN_POINTS}


def plot(results: harness.Results, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    panels = _panels(results.rows)
    if not panels:
        print("no sweep over T with enough points: skipping the plot")
        return None
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    colors: dict[str, str] = {}  # one color per provider across panels, plain and graph alike
    for ax, ((op, fixed, mode), rows) in zip(axes.flat, panels.items()):
        lines: dict[tuple, list] = {}
        for r in rows:
            lines.setdefault((r["provider"], r["timing"]), []).append((r["T"], r["ms"]))
        for (provider, timing), points in lines.items():
            points.sort()
            color = "black" if provider == "floor" else colors.setdefault(provider, f"C{len(colors)}")
            style = ":" if provider == "floor" else "--" if timing == "graph" else "-"
            label = provider + (" (graph)" if timing == "graph" else "")
            ax.plot(*zip(*points), marker="o", markersize=3, color=color, linestyle=style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T tokens")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op} {' '.join(f'{k}={v}' for k, v in fixed)} {mode}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{results.meta.get('card')}  {results.meta.get('date')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def regenerate(json_path: Path, out_dir: Path | None = None) -> list[Path]:
    results = harness.Results.from_json(json.loads(json_path.read_text()))
    out_dir = out_dir or json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{json_path.stem}.md"
    md.write_text(harness.markdown(results))
    png = plot(results, out_dir / f"{json_path.stem}.png")
    return [md] + ([png] if png else [])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results JSON from bench.lora / bench.model_train / bench.gpu_suite")
    p.add_argument("--out", type=Path, help="output directory (default: beside the JSON)")
    args = p.parse_args(argv)
    for path in regenerate(args.results, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
