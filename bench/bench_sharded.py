"""Per-rank cost of the sharded ICD loss against the gather-everything path it replaces, and
the blockwise backend against the reference and the fused kernel (CPU).

Sharded: with W ranks of B = N/W rows, each rank runs the row-range kernels on the gathered
features for its B rows (forward + backward, 6 B N D multiply-adds); the gather-everything
path (the training application before the sharded loss) ran the whole N-row loss on every
rank (forward + backward). Each rank uses one thread; the machine has fewer cores than the
largest W, so one rank's share is timed alone on the gathered inputs, which is exactly what
each rank computes (the collectives move B x 2D features and N x 3 statistics: see
docs/scaling.md). W = 1 is the plain loss (icd_loss_sharded without a group is icd_loss).

Times are medians of repeats with their min and max, the compared steps interleaved repeat
by repeat; peak memory is the most bytes allocated at once above the inputs during one
forward + backward, counted by a malloc wrapper (the script re-runs itself under it).

    PYTHONPATH=. python bench/bench_sharded.py                  # writes bench/results/
    PYTHONPATH=. python bench/bench_sharded.py --sizes 2048 --repeats 3   # a quick look
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import icd_fast
from icd_fast import blockwise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_icd_loss import (RESULTS_DIR, AllocationCounter, machine_info,  # noqa: E402
                            rerun_under_counting_malloc)

TARGET = 1.7  # per-rank time at most TARGET / W of the gather-everything path, N >= 8192


def inputs(n: int, d: int):
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(n, d, generator=gen)
    z_t = torch.randn(n, d, generator=gen)
    return z_s, z_t, torch.tensor(1.0)


def share_step(forward_rows, backward_rows, z_s, z_t, theta, rows: int):
    """One rank's forward + backward: rows [0, rows) of the gathered N-row problem. The N x 3
    statistics the backward needs come from all ranks; here they are this rank's repeated,
    which costs the same."""
    n = z_s.shape[0]
    r, c, k, ce, unit, norms = forward_rows(z_s, z_t, theta, 0, rows, 10.0)
    stats = [x.repeat((n + rows - 1) // rows)[:n] for x in (r, c, k)]
    weight = torch.full((n,), 1.0 / n)
    return backward_rows(unit, norms, theta, *stats, weight, weight, 0, rows, 10.0,
                         torch.float32, False)


def whole_step(backend: str, z_s, z_t, theta):
    """What every rank of the gather-everything path computed: the loss of all N rows."""
    z_s = z_s.detach().requires_grad_(True)
    z_t = z_t.detach().requires_grad_(True)
    theta = theta.detach().requires_grad_(True)
    icd_fast.icd_loss(z_s, z_t, theta, backend=backend).backward()
    return z_s.grad


def measure(steps: dict, repeats: int, counter: AllocationCounter) -> dict:
    """Peak bytes of one call of each step, then `repeats` rounds in which every step runs
    once in turn (interleaved, so that a change of the machine's load falls on all alike)."""
    results = {}
    for name, step in steps.items():
        step()  # warm-up
        gc.collect()
        start = counter.live()
        counter.reset_peak()
        step()
        results[name] = {"peak_bytes": counter.peak() - start, "samples_s": []}
    for _ in range(repeats):
        for name, step in steps.items():
            began = time.perf_counter()
            step()
            results[name]["samples_s"].append(time.perf_counter() - began)
    for r in results.values():
        times = r["samples_s"]
        r.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times))
    return results


def spread(m: dict) -> str:
    return f"{m['median_s'] * 1e3:9.1f} ms [{m['min_s'] * 1e3:.1f}-{m['max_s'] * 1e3:.1f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeats per configuration (3 at N >= 32768)")
    parser.add_argument("--blockwise-sizes", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rerun_under_counting_malloc()
    torch.set_num_threads(1)
    counter = AllocationCounter()
    info = machine_info(torch.device("cpu"))
    print(f"{info['cpu']} ({info['isa']}), 1 thread per rank, torch {info['torch']}, "
          f"D = {args.dim}, float32; load average {info['load_average_1_5_15_min']}")
    fused_rows = (torch.ops.icd_fast.icd_forward_rows, torch.ops.icd_fast.icd_backward_rows)
    sharded, compared = [], []
    for n in args.sizes:
        repeats = 3 if n >= 32768 else args.repeats
        z_s, z_t, theta = inputs(n, args.dim)
        steps = {1: lambda: whole_step("cpu", z_s, z_t, theta)}
        for world in args.worlds:
            if world > 1:
                steps[world] = (lambda rows: lambda: share_step(*fused_rows, z_s, z_t, theta,
                                                                rows))(n // world)
        measured = measure(steps, repeats, counter)
        today = measured[1]
        print(f"N {n:>6}: gather-everything (every rank) {spread(today)}, "
              f"peak {today['peak_bytes'] / 2**20:.1f} MiB")
        for world in args.worlds:
            share = measured[world]
            ratio = share["median_s"] / today["median_s"]
            row = {"n": n, "d": args.dim, "world": world, "rows_per_rank": n // world,
                   "share": share, "gather_everything": today, "ratio": ratio,
                   "target_ratio": TARGET / world,
                   "meets_target": ratio <= TARGET / world if n >= 8192 else None,
                   "peak_in_nd4": share["peak_bytes"] / (n * args.dim * 4)}
            sharded.append(row)
            print(f"  W {world}: per rank {spread(share)}  ratio {ratio:.3f} (target "
                  f"<= {TARGET / world:.3f}, 1.5/W = {1.5 / world:.3f})  peak "
                  f"{share['peak_bytes'] / 2**20:.1f} MiB = {row['peak_in_nd4']:.2f} N*D*4")
        del z_s, z_t, steps
    for n in args.blockwise_sizes:
        z_s, z_t, theta = inputs(n, args.dim)
        measured = measure({backend: (lambda b: lambda: whole_step(b, z_s, z_t, theta))(backend)
                            for backend in ("cpu", "blockwise", "reference")},
                           args.repeats, counter)
        for backend, m in measured.items():
            compared.append({"n": n, "d": args.dim, "backend": backend, **m})
            print(f"N {n:>6} {backend:>9}: {spread(m)}  peak {m['peak_bytes'] / 2**20:8.1f} MiB")
    report = {
        "what": "per-rank forward + backward time (1 thread) and peak bytes of the sharded ICD "
                "loss (one rank's share timed alone on the gathered inputs) against the "
                "gather-everything path (the whole loss on every rank); blockwise vs reference "
                "vs fused on the whole loss",
        "blockwise_tile": blockwise.DEFAULT_TILE,
        "machine": info, "sharded": sharded, "backends": compared}
    out = args.out or RESULTS_DIR / f"sharded-cpu-{info['date'][:10]}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
