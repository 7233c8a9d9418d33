"""Speed and memory of the ICD loss: fused kernel vs eager reference vs torch.compile
(default and max-autotune) vs a product roofline.

All implementations run in one process on the same inputs, warm-up first, median of
repeats; the table prints ratios against eager. Forward is timed with autograd recording (as
in training), backward separately after it, and "both" is their sum in one repeat; on a GPU
with CUDA events. Every time is the median of at least 5 repeats, stored with its samples and
printed with its spread (min-max). Peak memory is the most bytes allocated at once above the
level before the repeats (inputs allocated, no gradients held), so it includes the
gradients and the tensors saved for the backward: on the CPU counted by a malloc wrapper (tests/allocation_counter;
the script re-runs itself under it), so that it sees every allocation of the fused kernel
(torch tensors, operator new, BLAS), whether or not the pages were already resident; on a
GPU torch.cuda.max_memory_allocated.

"module" rows time the drop-in criterion as users call it, heads included:
icd_fast.ICDLoss (fused) against the authors' formulation (two nn.Linear heads, then the
plain-PyTorch loss with the bias in the logits), same weights, forward + backward.

"roofline" is what the fused kernel cannot beat by much: the time torch.mm takes for the
same number of N x N x D products (1 in the forward: the logits; 3 in the backward: the
logits again and the two gradient products), computed in row blocks so that no N x N
buffer is needed.

    python bench/bench_icd_loss.py --quick          # a minute: N in {64, 256, 1024}, D = 128
    python bench/bench_icd_loss.py                  # the full grid, writes bench/results/
    python bench/bench_icd_loss.py --sizes 64 256 1024 4096 --dims 128 --impls eager fused \
        roofline --module-sizes 64 256              # what fits a loaded 2-core machine
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import icd_fast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from allocation_counter import build_counting_malloc  # noqa: E402

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
            cpuinfo = f.read()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                         if line.startswith("flags")))
        info["isa"] = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
        info["isa_flags"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                            "avx512_bf16", "avx512_vnni", "amx_tile"})
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    # Other jobs on the machine slow every timing; the load average says how busy it was.
    info["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


COUNTING_MALLOC_ENV = "ICD_FAST_BENCH_COUNTING_MALLOC"


def rerun_under_counting_malloc() -> None:
    """Replaces this process by itself under the counting malloc (once)."""
    if os.environ.get(COUNTING_MALLOC_ENV):
        return
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"icd_fast_bench_{os.getuid()}"
    folder.mkdir(exist_ok=True)
    library = build_counting_malloc(str(folder))
    env = dict(os.environ, LD_PRELOAD=library, **{COUNTING_MALLOC_ENV: library})
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class AllocationCounter:
    """The counting malloc's live and peak bytes (this process runs under it)."""

    def __init__(self):
        self.lib = ctypes.CDLL(None)
        if not hasattr(self.lib, "counting_malloc_peak_bytes"):
            raise RuntimeError("not running under the counting malloc; CPU peak memory needs it "
                               "(run the script directly: it re-runs itself under it)")
        for name in ("counting_malloc_live_bytes", "counting_malloc_peak_bytes"):
            getattr(self.lib, name).restype = ctypes.c_int64

    def live(self) -> int:
        return self.lib.counting_malloc_live_bytes()

    def reset_peak(self) -> None:
        self.lib.counting_malloc_reset_peak()

    def peak(self) -> int:
        return self.lib.counting_malloc_peak_bytes()


class PeakMemory:
    """Most bytes allocated at once by the code in a `with` block, above the level at its
    start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.counter = AllocationCounter()
            self.base = self.counter.live()
            self.counter.reset_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self.counter.peak() - self.base


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
    """Medians of (forward, backward) seconds, the forward+backward samples and their spread."""
    both = [(r[0] + r[1]) * 1e3 for r in runs]
    return {"forward_ms": statistics.median(r[0] for r in runs) * 1e3,
            "backward_ms": statistics.median(r[1] for r in runs) * 1e3,
            "both_ms": statistics.median(both), "both_ms_min": min(both),
            "both_ms_max": max(both), "both_ms_samples": both,
            "peak_mem_mb": mem.peak / 2**20, "repeats": repeats}


def spread(r) -> str:
    if "both_ms_min" not in r:  # results recorded before the spread was kept
        return f"{r['both_ms']:.3g}"
    return f"{r['both_ms']:.3g} [{r['both_ms_min']:.3g}-{r['both_ms_max']:.3g}]"


def measure(fn, n, d, dtype, device, repeats, warmup):
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    z_t = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    th = torch.tensor(1.0, device=device, requires_grad=True)
    for _ in range(warmup):
        time_once(fn, z_s, z_t, th, device)
    for x in (z_s, z_t, th):  # the peak then includes the gradients each repeat allocates
        x.grad = None
    with PeakMemory(device) as mem:
        runs = [time_once(fn, z_s, z_t, th, device) for _ in range(repeats)]
    return summarize(runs, mem, repeats)


MIN_REPEATS = 5


def repeats_for(n: int, base: int) -> int:
    """More repeats where one is short; never fewer than MIN_REPEATS."""
    return max(MIN_REPEATS, base * 4 if n <= 1024 else base)


class AuthorsCriterion(nn.Module):
    """The authors' formulation as users of their code call it: two linear heads, then the
    loss on the N x N logits (bias included) in plain PyTorch."""

    def __init__(self, fused: icd_fast.ICDLoss):
        super().__init__()
        self.embed_s = nn.Linear(fused.embed_s.in_features, fused.embed_s.out_features)
        self.embed_t = nn.Linear(fused.embed_t.in_features, fused.embed_t.out_features)
        self.load_state_dict({k: v for k, v in fused.state_dict().items()
                              if k.startswith("embed_")}, strict=False)
        self.log_scale = nn.Parameter(fused.log_scale.detach().clone())
        self.bias = nn.Parameter(fused.bias.detach().clone())

    def forward(self, f_s, f_t):
        return icd_fast.icd_loss_reference(self.embed_s(f_s), self.embed_t(f_t),
                                           self.log_scale, self.bias)


def measure_module(impl: str, n: int, s_dim: int, t_dim: int, device, repeats: int,
                   warmup: int = 3) -> dict:
    """Forward + backward of the criterion with its heads ("module-fused": icd_fast.ICDLoss,
    "module-authors": AuthorsCriterion with the same weights)."""
    torch.manual_seed(0)
    fused = icd_fast.ICDLoss(s_dim, t_dim, feat_dim=128, backend=device.type).to(device)
    criterion = fused if impl == "module-fused" else AuthorsCriterion(fused).to(device)
    gen = torch.Generator().manual_seed(1)
    f_s = torch.randn(n, s_dim, generator=gen).to(device).requires_grad_()
    f_t = torch.randn(n, t_dim, generator=gen).to(device)

    def step():
        criterion.zero_grad(set_to_none=True)
        f_s.grad = None
        sync(device)
        watch = Stopwatch(device)
        watch.mark()
        loss = criterion(f_s, f_t)
        watch.mark()
        loss.backward()
        watch.mark()
        return tuple(watch.intervals())

    for _ in range(warmup):
        step()
    criterion.zero_grad(set_to_none=True)
    f_s.grad = None
    with PeakMemory(device) as mem:
        runs = [step() for _ in range(repeats)]
    return summarize(runs, mem, repeats)


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
    header = (f"{'D':>5} {'N':>7} {'impl':>8} {'fwd ms':>10} {'bwd ms':>10}"
              f" {'both ms [min-max]':>22}"
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
                repeats = repeats_for(n, args.repeats)
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
                      f" {spread(r):>22} {r['peak_mem_mb']:>9.1f} {ratio:>9}", flush=True)
    module_rows = []
    for s_dim, t_dim in args.module_widths:
        for n in args.module_sizes:
            results = {impl: measure_module(impl, n, s_dim, t_dim, device,
                                            repeats_for(n, args.repeats))
                       for impl in ("module-authors", "module-fused")}
            for impl, r in results.items():
                r.update(impl=impl, n=n, s_dim=s_dim, t_dim=t_dim, feat_dim=128,
                         speedup_vs_authors=results["module-authors"]["both_ms"] / r["both_ms"])
                module_rows.append(r)
                print(f"module s_dim {s_dim} t_dim {t_dim} N {n:>5} {impl:>14} {spread(r):>22}"
                      f" {r['peak_mem_mb']:>7.1f} MB {r['speedup_vs_authors']:.2f}x", flush=True)
    return {"machine": info, "dtype": args.dtype, "results": rows, "module_results": module_rows}


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
            return spread(by_impl[impl]) if impl in by_impl else "O(N²) memory"

        def ratio(num, den):
            if num in by_impl and den in by_impl:
                return f"{by_impl[num]['both_ms'] / by_impl[den]['both_ms']:.2f}x"
            return "-"
        cells = ([ms(i) for i in present] + [ratio(i, "fused") for i in compared]
                 + ([ratio("roofline", "fused")] if "roofline" in present else []))
        cells.append(" / ".join(f"{by_impl[i]['peak_mem_mb']:.1f}" if i in by_impl else "-"
                              for i in ("eager", "fused")))
        lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
    modules = report.get("module_results", [])
    if modules:
        lines += ["", "| s_dim / t_dim | N | authors' criterion ms | icd_fast.ICDLoss ms"
                  " | ICDLoss vs authors | peak MB authors / ICDLoss |", "|---" * 6 + "|"]
        for s_dim, t_dim, n in sorted({(r["s_dim"], r["t_dim"], r["n"]) for r in modules}):
            pair = {r["impl"]: r for r in modules
                    if (r["s_dim"], r["t_dim"], r["n"]) == (s_dim, t_dim, n)}
            authors, fused = pair["module-authors"], pair["module-fused"]
            lines.append(f"| {s_dim} / {t_dim} | {n} | {spread(authors)} | {spread(fused)} | "
                         f"{authors['both_ms'] / fused['both_ms']:.2f}x | "
                         f"{authors['peak_mem_mb']:.1f} / {fused['peak_mem_mb']:.1f} |")
    return "\n".join(lines)


def widths(text: str) -> tuple:
    s_dim, t_dim = (int(x) for x in text.split(":"))
    return s_dim, t_dim


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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before timing (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"repeats per timing (at least {MIN_REPEATS}; 4x that for N <= 1024)")
    parser.add_argument("--module-sizes", type=int, nargs="*", default=[64, 256],
                        help="batch sizes of the drop-in module rows (none: no module rows)")
    parser.add_argument("--module-widths", type=widths, nargs="*",
                        default=[(64, 256), (256, 2048)],
                        help="student:teacher feature widths of the module rows")
    parser.add_argument("--max-reference-n", type=int, default=16384,
                        help="largest N for the eager and compiled references")
    parser.add_argument("--reference-memory-gb", type=float, default=12.0,
                        help="skip references whose N x N buffers would exceed this")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/cpu-<date>.json); PNG beside it")
    parser.add_argument("--table", type=Path, default=None,
                        help="print a results JSON as a Markdown table and exit")
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be at least {MIN_REPEATS}")
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return True
    if args.quick:
        args.sizes, args.dims = [64, 256, 1024], [128]
    if args.device == "cpu":
        rerun_under_counting_malloc()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
