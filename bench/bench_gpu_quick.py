"""The GPU session's quick benchmark: forward + backward of the fused CUDA loss against the
eager reference and torch.compile of it, at N = 64, 1024, 16384, D = 128, fp32 and bf16.

About 30 seconds of timing (plus torch.compile's compilations, one per shape), written as
one JSON: the machine, torch, the device's name and compute capability, and per config the
median, min and max of the forward + backward times with their samples.

    python bench/bench_gpu_quick.py --out quick-bench.json
    python bench/bench_gpu_quick.py --device cpu --sizes 8 --impls eager fused   # a smoke test

Each config repeats until it has spent --seconds (at least 5, at most 200 repeats), after
warm-up calls that keep module loading and compilation out of the numbers; on a GPU the
times come from CUDA events (bench_icd_loss.py's Stopwatch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_icd_loss import loss_function, machine_info, time_once  # noqa: E402

MIN_REPEATS = 5
MAX_REPEATS = 200
WARMUP_CALLS = 2


def inputs(n, d, dtype, device):
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    z_t = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    theta = torch.tensor(1.0, device=device, requires_grad=True)
    return z_s, z_t, theta


def time_config(impl, n, d, dtype, device, seconds):
    """Forward + backward milliseconds of one implementation: median, spread and samples."""
    fn = loss_function(impl)
    z_s, z_t, theta = inputs(n, d, dtype, device)
    for _ in range(WARMUP_CALLS):
        time_once(fn, z_s, z_t, theta, device)
    samples, forward, backward = [], [], []
    started = time.perf_counter()
    while len(samples) < MAX_REPEATS and (
            len(samples) < MIN_REPEATS or time.perf_counter() - started < seconds):
        fwd, bwd = time_once(fn, z_s, z_t, theta, device)
        forward.append(fwd * 1e3)
        backward.append(bwd * 1e3)
        samples.append((fwd + bwd) * 1e3)
    return {"impl": impl, "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
            "median_ms": statistics.median(samples), "min_ms": min(samples),
            "max_ms": max(samples), "forward_median_ms": statistics.median(forward),
            "backward_median_ms": statistics.median(backward), "repeats": len(samples),
            "samples_ms": samples}


def time_or_error(impl, n, d, dtype, device, seconds):
    """time_config's row, or the error that stopped it (out of memory, a compile failure):
    one failing implementation must not cost the session the others' numbers."""
    try:
        return time_config(impl, n, d, dtype, device, seconds)
    except Exception as error:  # noqa: BLE001  (recorded in the results and the exit status)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"impl": impl, "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
                "error": f"{type(error).__name__}: {error}"[:500]}


def run(args) -> dict:
    """Times every config and rewrites args.out after each, so that a run cut short leaves
    what it measured."""
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
    else:
        name, capability = "cpu", None
    configs = [(dtype, n, d) for dtype in args.dtypes for d in args.dims for n in args.sizes]
    seconds = args.seconds / max(1, len(configs) * len(args.impls))
    report = {"machine": machine_info(device), "device_name": name, "capability": capability,
              "settings": {"seconds": args.seconds, "min_repeats": MIN_REPEATS,
                           "max_repeats": MAX_REPEATS, "warmup_calls": WARMUP_CALLS},
              "results": []}
    print(f"# {name} | torch {torch.__version__} | {seconds:.2f} s per timing", flush=True)
    print(f"{'dtype':>9} {'N':>6} {'D':>4} {'impl':>8} {'median ms [min-max]':>28} {'vs fused':>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for dtype_name, n, d in configs:
        dtype = getattr(torch, dtype_name)
        rows = [time_or_error(impl, n, d, dtype, device, seconds) for impl in args.impls]
        fused = next((r for r in rows if r["impl"] == "fused" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"{dtype_name:>9} {n:>6} {d:>4} {r['impl']:>8} {r['error']}", flush=True)
                continue
            r["fused_speedup"] = r["median_ms"] / fused["median_ms"] if fused else None
            ratio = f"{r['fused_speedup']:.2f}x" if fused else "-"
            spread = f"{r['median_ms']:.4g} [{r['min_ms']:.4g}-{r['max_ms']:.4g}]"
            print(f"{dtype_name:>9} {n:>6} {d:>4} {r['impl']:>8} {spread:>28} {ratio:>9}",
                  flush=True)
        report["results"] += rows
        args.out.write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--impls", nargs="+", default=["fused", "eager", "compile"],
                        choices=["fused", "eager", "compile"])
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="timing budget of the whole run, split evenly over the timings")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    report = run(args)
    failed = [r for r in report["results"] if "error" in r]
    print(f"wrote {args.out}" + (f"; {len(failed)} timings failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
