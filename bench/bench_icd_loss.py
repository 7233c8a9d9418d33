"""Speed and memory of the ICD loss: fused kernel vs eager reference vs torch.compile
(default and max-autotune) vs a product roofline.

All implementations run in one process on the same inputs, warm-up first, median of
repeats; the table prints ratios against eager. Forward is timed with autograd recording (as
in training), backward separately after it, and "both" is their sum in one repeat; on a GPU
with CUDA events. Peak memory is the rise of the process's peak RSS (CPU; the high-water mark
is reset before each measurement) or of torch.cuda.max_memory_allocated (GPU).

"roofline" is what the fused kernel cannot beat by much: the time torch.mm takes for the
same number of N x N x D products (1 in the forward: the logits; 3 in the backward: the
logits again and the two gradient products), computed in row blocks so that no N x N
buffer is needed.

    python bench/bench_icd_loss.py --quick          # a minute: N in {64, 256, 1024}, D = 128
    python bench/bench_icd_loss.py                  # the full grid, writes bench/results/
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import icd_fast

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# eager first: the others are compared to it
IMPLEMENTATIONS = ("eager", "fused", "compile", "autotune", "roofline")
REFERENCE_BASED = ("eager", "compile", "autotune")  # O(N^2) memory


def machine_info(device: torch.device) -> dict:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "icd_fast": icd_fast.__version__,
        "build": icd_fast.build_info(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class PeakMemory:
    """Peak memory added by the code in a `with` block, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(0, self._status("VmHWM:") - self.base)


def loss_function(impl: str):
    if impl == "fused":
        # The device's own kernel, named: "auto" would fall back to the reference where a
        # kernel is not yet trusted (see icd_fast.functional).
        return lambda z_s, z_t, th: icd_fast.icd_loss(z_s, z_t, th, backend=z_s.device.type)
    if impl == "eager":
        return icd_fast.icd_loss_reference
    if impl in ("compile", "autotune"):
        # A fresh compilation per shape (dynamo would stop recompiling after 8 shapes).
        torch._dynamo.reset()
        mode = "max-autotune" if impl == "autotune" else "default"
        return torch.compile(icd_fast.icd_loss_reference, mode=mode, dynamic=False)
    raise ValueError(impl)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Marks on the host clock (CPU) or CUDA events on the current stream (GPU)."""

    def __init__(self, device):
        self.device = device
        self.marks = []

    def mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self):
        """Seconds between consecutive marks."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_once(fn, z_s, z_t, th, device):
    """(forward, backward) seconds of one training-style call."""
    for x in (z_s, z_t, th):
        x.grad = None
    sync(device)
    watch = Stopwatch(device)
    watch.mark()
    loss = fn(z_s, z_t, th)
    watch.mark()
    loss.backward()
    watch.mark()
    return tuple(watch.intervals())


def roofline_products(n: int, d: int, dtype, device):
    """(forward, backward) callables doing the fused algorithm's N x N x D products with
    torch.mm (1 forward, 3 backward), in row blocks of at most 2^28 output elements."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=gen).to(device, dtype)
    b = torch.randn(n, d, generator=gen).to(device, dtype)
    rows = max(1, min(n, 2**28 // n))
    blocks = [(start, min(n, start + rows)) for start in range(0, n, rows)]
    tile = torch.empty(rows, n, device=device, dtype=dtype)
    grad = torch.empty(n, d, device=device, dtype=dtype)

    def logits(start, stop):
        torch.mm(a[start:stop], b.t(), out=tile[:stop - start])

    def gradient(start, stop):
        torch.mm(tile[:stop - start], b, out=grad[start:stop])

    def forward():
        for start, stop in blocks:
            logits(start, stop)

    def backward():
        for start, stop in blocks:
            logits(start, stop)
            gradient(start, stop)
            gradient(start, stop)

    return forward, backward


def measure_roofline(n, d, dtype, device, repeats, warmup):
    forward, backward = roofline_products(n, d, dtype, device)
    for _ in range(warmup):
        forward(), backward()
    runs = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            sync(device)
            watch = Stopwatch(device)
            watch.mark()
            forward()
            watch.mark()
            backward()
            watch.mark()
            runs.append(watch.intervals())
    return summarize(runs, mem, repeats)


def summarize(runs, mem, repeats):
    fwd = statistics.median(r[0] for r in runs)
    bwd = statistics.median(r[1] for r in runs)
    both = statistics.median(r[0] + r[1] for r in runs)
    return {"forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "both_ms": both * 1e3,
            "peak_mem_mb": mem.peak / 2**20, "repeats": repeats}


def measure(fn, n, d, dtype, device, repeats, warmup):
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    z_t = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    th = torch.tensor(1.0, device=device, requires_grad=True)
    for _ in range(warmup):
        time_once(fn, z_s, z_t, th, device)
    with PeakMemory(device) as mem:
        runs = [time_once(fn, z_s, z_t, th, device) for _ in range(repeats)]
    return summarize(runs, mem, repeats)


def repeats_for(n: int, impl: str, base: int) -> int:
    work = n * n
    if work <= 1024**2:
        return base * 4
    if work <= 4096**2:
        return base
    return 1 if impl not in ("fused", "roofline") or n > 16384 else max(1, base // 2)


def eager_fits(n: int, dtype: torch.dtype, budget_bytes: float) -> bool:
    # The reference holds about eight N x N buffers at its peak.
    return 8 * n * n * torch.finfo(dtype).bits / 8 <= budget_bytes


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = machine_info(device)
    print(f"# {info['cpu'] if device.type == 'cpu' else info.get('gpu')} | torch {info['torch']}"
          f" | threads {info['threads']} | {args.dtype} | {info['date']}", flush=True)
    rows = []
    header = (f"{'D':>5} {'N':>7} {'impl':>8} {'fwd ms':>10} {'bwd ms':>10} {'both ms':>10}"
              f" {'peak MB':>9} {'vs eager':>9}")
    print(header)
    for d in args.dims:
        for n in args.sizes:
            eager_both = None
            for impl in args.impls:
                if impl in REFERENCE_BASED and (
                        n > args.max_reference_n or
                        not eager_fits(n, dtype, args.reference_memory_gb * 2**30)):
                    rows.append({"impl": impl, "n": n, "d": d, "skipped": "O(N^2) memory/time"})
                    print(f"{d:>5} {n:>7} {impl:>8} {'skipped (O(N^2) memory)':>42}")
                    continue
                repeats = repeats_for(n, impl, args.repeats)
                warmup = 1 if n > 4096 else 3
                if impl == "roofline":
                    r = measure_roofline(n, d, dtype, device, repeats, warmup)
                else:
                    r = measure(loss_function(impl), n, d, dtype, device, repeats, warmup)
                r.update(impl=impl, n=n, d=d)
                if impl == "eager":
                    eager_both = r["both_ms"]
                ratio = f"{eager_both / r['both_ms']:.2f}x" if eager_both else "-"
                r["speedup_vs_eager"] = eager_both / r["both_ms"] if eager_both else None
                rows.append(r)
                print(f"{d:>5} {n:>7} {impl:>8} {r['forward_ms']:>10.3f} {r['backward_ms']:>10.3f}"
                      f" {r['both_ms']:>10.3f} {r['peak_mem_mb']:>9.1f} {ratio:>9}", flush=True)
    return {"machine": info, "dtype": args.dtype, "results": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "skipped" not in r]
    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for impl in IMPLEMENTATIONS:
            pts = sorted((r["n"], r["both_ms"]) for r in rows if r["d"] == d and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch size N", ylabel="forward+backward ms",
               title=f"ICD loss, D = {d}, {report['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    machine = report["machine"]
    fig.suptitle(f"{machine.get('gpu') or machine['cpu']} | torch {machine['torch']} | "
                 f"{machine['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(report: dict) -> str:
    """The forward+backward times of a results file as a Markdown table (the columns of
    the implementations it holds)."""
    rows = report["results"]
    present = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in rows)]
    titles = {"eager": "eager", "compile": "torch.compile", "autotune": "compile max-autotune",
              "fused": "fused", "roofline": "mm roofline"}
    compared = [i for i in ("eager", "compile", "autotune") if i in present]
    head = ([f"{titles[i]} ms" for i in present] + [f"fused vs {titles[i]}" for i in compared]
            + (["roofline / fused"] if "roofline" in present else [])
            + ["peak MB eager / fused"])
    lines = ["| D | N | " + " | ".join(head) + " |", "|---" * (2 + len(head)) + "|"]
    for d, n in sorted({(r["d"], r["n"]) for r in rows}):
        by_impl = {r["impl"]: r for r in rows if r["d"] == d and r["n"] == n and "skipped" not in r}

        def ms(impl):
            return f"{by_impl[impl]['both_ms']:.3g}" if impl in by_impl else "O(N²) memory"

        def ratio(num, den):
            if num in by_impl and den in by_impl:
                return f"{by_impl[num]['both_ms'] / by_impl[den]['both_ms']:.2f}x"
            return "-"
        cells = ([ms(i) for i in present] + [ratio(i, "fused") for i in compared]
                 + ([ratio("roofline", "fused")] if "roofline" in present else []))
        cells.append("/".join(f"{by_impl[i]['peak_mem_mb']:.0f}" if i in by_impl else "-"
                              for i in ("eager", "fused")))
        lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N in {64, 256, 1024}, D = 128, no files written")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                        help="what to time (max-autotune compiles for minutes per shape)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-reference-n", type=int, default=16384,
                        help="largest N for the eager and compiled references")
    parser.add_argument("--reference-memory-gb", type=float, default=12.0,
                        help="skip references whose N x N buffers would exceed this")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/cpu-<date>.json); PNG beside it")
    parser.add_argument("--table", type=Path, default=None,
                        help="print a results JSON as a Markdown table and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return True
    if args.quick:
        args.sizes, args.dims = [64, 256, 1024], [128]
    report = run(args)
    if args.quick and args.out is None:
        return report
    out = args.out or RESULTS_DIR / f"{args.device}-{args.dtype}-{report['machine']['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
