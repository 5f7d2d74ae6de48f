"""Benchmark: learn one operator from a 2304x2304 field with ~600 beads, I=5 (issue: learn).

Target: at most 5 s wall on 2 cores, peak memory under 2 GB (the paper: 150 s on a GPU
workstation). Prints the share of each step and writes a section of docs/performance.md.

    .venv/bin/python benchmarks/learn_operator.py [--size 2304] [--beads 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=2304)
    p.add_argument("--beads", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from pcmx.learn import learn_operator
    from pcmx.simulate import simulate_beads

    sim = simulate_beads((args.size, args.size), args.beads, min_separation=40, seed=1)
    image = sim["image"].load()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    walls, runs = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        op = learn_operator(image, n_components=5, validate=False)
        walls.append(time.perf_counter() - t0)
        runs.append(op.attrs["pcmx_parameters"]["timings_s"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall = statistics.median(walls)
    # the default: validated by 5-fold cross-validation (5 more fits) and model selection
    t0 = time.perf_counter()
    checked = learn_operator(image, n_components=5)
    wall_cv = time.perf_counter() - t0
    peak_cv = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cv = checked.attrs["pcmx_parameters"]["cross_validation"]
    # every option at its default: I by the rank rule, validation and model selection
    t0 = time.perf_counter()
    default = learn_operator(image)
    wall_def = time.perf_counter() - t0
    sel = default.attrs["pcmx_parameters"].get("model_selection", {})
    steps = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "total"}
    counts = op.attrs["pcmx_parameters"]["counts"]
    lines = [
        f"learn_operator, {args.size}x{args.size}, {args.beads} beads simulated, I=5: "
        f"median {wall:.2f} s over {args.repeats} runs (target 5 s), "
        f"peak RSS {peak:.0f} MiB (process incl. simulation; before learning {base:.0f} MiB; target 2048)",
        f"with the default validation (5 folds, model selection): {wall_cv:.2f} s "
        f"({wall_cv / wall:.1f}x), peak RSS {peak_cv:.0f} MiB; held-out error "
        f"{cv['median_error']:.3f} vs {cv['median_error_invariant']:.3f} for the reference",
        f"every option at its default (I by the rank rule, validation, model selection): "
        f"{wall_def:.2f} s (target 5 s); stored: {sel.get('chosen', sel.get('stored', '?'))}, "
        f"I = {default.sizes['component']}",
        f"beads: {counts}",
        "",
        "| step | seconds | share |",
        "|---|---|---|",
    ]
    for k, v in steps.items():
        lines.append(f"| {k} | {v:.3f} | {100 * v / wall:.0f}% |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
        old = doc.read_text() if doc.exists() else "# Performance\n"
        block = f"<!-- learn_operator:begin -->\n## Learning one operator\n\n{text}\n<!-- learn_operator:end -->"
        if "<!-- learn_operator:begin -->" in old:
            new = re.sub(r"<!-- learn_operator:begin -->.*<!-- learn_operator:end -->", block, old, flags=re.S)
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
        doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
