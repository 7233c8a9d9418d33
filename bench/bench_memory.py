"""Bytes the fused CPU loss allocates during one forward + backward, at 2 and 32 threads.

Each measurement runs in a child process under a counting malloc (tests/allocation_counter),
which sees every allocation: torch tensors, operator new, std::vector, BLAS buffers. 32
threads run fine on a 2-core machine; what is measured is memory, not time. Figures are
given in bytes and as multiples of N*D*4 (one fp32 N x D matrix).

    PYTHONPATH=. python bench/bench_memory.py            # writes bench/results/cpu-memory-<date>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_icd_loss import RESULTS_DIR, machine_info  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from allocation_counter import measure_icd_allocations  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x128", "4096x512", "16384x128"],
                        help="NxD")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    info = machine_info(torch.device("cpu"))
    rows = []
    for shape in args.shapes:
        n, d = (int(x) for x in shape.split("x"))
        for threads in args.threads:
            r = measure_icd_allocations(n, d, threads, "float32")
            n_by_d = n * d * 4
            for key in ("forward_peak_bytes", "forward_kept_bytes", "step_peak_bytes"):
                r[key.replace("_bytes", "_in_ndx4")] = round(r[key] / n_by_d, 3)
            r["one_n_by_n_fp32_bytes"] = n * n * 4
            rows.append(r)
            print(f"N {n:>6} D {d:>4} threads {threads:>3}: forward peak "
                  f"{r['forward_peak_in_ndx4']:.2f} N*D*4, kept {r['forward_kept_in_ndx4']:.2f}, "
                  f"forward+backward peak {r['step_peak_in_ndx4']:.2f} N*D*4 "
                  f"({r['step_peak_bytes'] / 2**20:.1f} MiB)", flush=True)
    report = {
        "what": "bytes allocated above the starting level during one fused CPU forward "
                "(forward_peak; forward_kept = the tensors saved for the backward) and one "
                "forward + backward (step_peak, gradients included), float32, counted by a "
                "malloc wrapper in a child process after two warm-up steps",
        "note": "the machine was shared with other jobs while measuring (see the load "
                "average); this affects nothing here but the time it took",
        "machine": info, "results": rows}
    out = args.out or RESULTS_DIR / f"cpu-memory-{info['date'][:10]}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
