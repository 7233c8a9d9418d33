"""Markdown tables of the benchmark results in bench/results/, and the docs that show them.

A page under docs/ shows a table by naming its results file between two markers:

    <!-- table: bench/results/cpu-memory-2026-12-01.json -->
    (generated; do not edit)
    <!-- end table -->

`python bench/tables.py docs/benchmarks.md` rewrites every such block from its file, and
`--check` fails (exit 1) when a block is not what its file gives, so numbers in the docs are
never typed by hand (tests/bench/test_bench_tables.py runs the check).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_icd_loss import markdown_table as loss_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def sharded_table(report: dict) -> str:
    lines = ["| N | W | rows per rank | per rank ms [min-max] | gather-everything ms [min-max] "
             "| ratio | target (1.7/W) | per-rank peak MiB (N·D·4) |", "|---" * 8 + "|"]
    for row in report["sharded"]:
        share, today = row["share"], row["gather_everything"]
        meets = "" if row["meets_target"] is None else (" ✓" if row["meets_target"] else " ✗")
        lines.append(
            f"| {row['n']} | {row['world']} | {row['rows_per_rank']} | "
            f"{ms(share['median_s'])} [{ms(share['min_s'])}-{ms(share['max_s'])}] | "
            f"{ms(today['median_s'])} [{ms(today['min_s'])}-{ms(today['max_s'])}] | "
            f"{row['ratio']:.3f}{meets} | {row['target_ratio']:.3f} | "
            f"{share['peak_bytes'] / 2**20:.1f} ({row['peak_in_nd4']:.2f}) |")
    backends = report.get("backends", [])
    if backends:
        lines += ["", "| N | backend | forward + backward ms [min-max] | peak MiB |",
                  "|---" * 4 + "|"]
        for row in backends:
            lines.append(f"| {row['n']} | {row['backend']} | {ms(row['median_s'])} "
                         f"[{ms(row['min_s'])}-{ms(row['max_s'])}] | "
                         f"{row['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def memory_table(report: dict) -> str:
    lines = ["| N | D | threads | forward peak (N·D·4) | forward + backward peak (N·D·4) "
             "| forward + backward MiB |", "|---" * 6 + "|"]
    for row in report["results"]:
        lines.append(f"| {row['n']} | {row['d']} | {row['threads']} | "
                     f"{row['forward_peak_in_ndx4']:.2f} | {row['step_peak_in_ndx4']:.2f} | "
                     f"{row['step_peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def crd_step_table(report: dict) -> str:
    lines = ["| what | median ms [min-max] | repeats |", "|---|---|---|"]
    for name, t in report["timings"].items():
        lines.append(f"| {name} | {t['median_ms']:.3g} [{t['min_ms']:.3g}-{t['max_ms']:.3g}] | "
                     f"{t['repeats']} |")
    return "\n".join(lines)


def machine_line(report: dict) -> str:
    machine = report.get("machine")
    if isinstance(machine, str):
        return f"*Machine: {machine}.*"
    if not isinstance(machine, dict):
        return ""
    threads = machine.get("threads")
    parts = [machine.get("cpu", "?"), machine.get("isa"),
             f"{threads} thread{'' if threads == 1 else 's'}",
             f"torch {machine.get('torch')}", machine.get("date", "")[:10]]
    load = machine.get("load_average_1_5_15_min")
    if load:
        parts.append(f"load average {load[0]}")
    if machine.get("gpu"):
        parts.insert(0, machine["gpu"])
    return "*Machine: " + ", ".join(str(p) for p in parts if p) + ".*"


# The kind of a results file, told by its keys.
RENDERERS: Dict[str, Callable[[dict], str]] = {
    "sharded": sharded_table,
    "timings": crd_step_table,
}


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    for key, renderer in RENDERERS.items():
        if key in report:
            table = renderer(report)
            break
    else:
        results = report.get("results", [])
        table = (memory_table(report) if results and "step_peak_bytes" in results[0]
                 else loss_table(report))
    return f"{table}\n\n{machine_line(report)}\n"


def refresh(text: str, root: Path = ROOT) -> str:
    """The page with every table block rewritten from its results file."""
    def block(match):
        body = render(root / match.group("path"))
        return f"{match.group(1)}{body}{match.group(4)}"
    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pages", type=Path, nargs="+", help="Markdown pages to refresh")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a page's tables are out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in args.pages:
        text = page.read_text()
        fresh = refresh(text)
        if fresh != text:
            stale.append(page)
            if not args.check:
                page.write_text(fresh)
    if args.check and stale:
        print(f"tables out of date in {', '.join(map(str, stale))}: run "
              f"python bench/tables.py {' '.join(map(str, stale))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
