"""The checks and verdicts bench/gpu_session.sh asks for, one subcommand each.

    python bench/gpu_session_tools.py visible-arch            # "9.0" on an H100
    python bench/gpu_session_tools.py build-has-arch 9.0      # exit 0: the built extension has it
    python bench/gpu_session_tools.py junit-verdict FILE      # pytest's counts; exit 1 unless clean
    python bench/gpu_session_tools.py sanitizer-verdict LOG   # compute-sanitizer's error count
    python bench/gpu_session_tools.py bench-lines FILE        # one line per quick-bench config
    python bench/gpu_session_tools.py ptxas-report LOG        # registers and spills per kernel
    python bench/gpu_session_tools.py check-returned DIR      # the device tool's rules for $OUT

Each prints one line (or a few) that the session appends to its summary, and exits 0 for a
pass, 1 for a failure. torch is imported only by the subcommands that need a GPU build.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# What the device tool brings back from $OUT (its README, "Limits").
MAX_RETURNED_FILES = 8
MAX_RETURNED_FOLDERS_DOWN = 2
MAX_RETURNED_FILE_BYTES = 16 * 2**20
MAX_RETURNED_TOTAL_BYTES = 64 * 2**20
RETURNABLE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def returned_file_problems(entries) -> list:
    """What the device tool would drop of a listing of $OUT: ``entries`` are
    (path relative to $OUT, size in bytes) pairs for every file under it."""
    problems = []
    entries = list(entries)
    if len(entries) > MAX_RETURNED_FILES:
        problems.append(f"{len(entries)} files, more than the {MAX_RETURNED_FILES} that come back")
    total = 0
    for path, size in entries:
        parts = Path(path).parts
        total += max(size, 0)  # links and other non-files are listed with -1
        bad = [part for part in parts if not RETURNABLE_NAME.match(part)]
        if bad:
            problems.append(f"{path}: {bad[0]!r} has characters outside [A-Za-z0-9._-]")
        if len(parts) - 1 > MAX_RETURNED_FOLDERS_DOWN:
            problems.append(f"{path}: {len(parts) - 1} folders down, more than "
                            f"{MAX_RETURNED_FOLDERS_DOWN}")
        if size > MAX_RETURNED_FILE_BYTES:
            problems.append(f"{path}: {size} bytes, over 16 MiB")
    if total > MAX_RETURNED_TOTAL_BYTES:
        problems.append(f"{total} bytes in all, over 64 MiB")
    return problems


def listing(root: Path) -> list:
    """(relative path, size) of every entry under root that is not a folder; links and other
    non-files are listed with a size that marks them (the tool returns only plain files)."""
    entries = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(folder, d))):
            path = Path(folder, name)
            size = path.stat().st_size if path.is_file() and not path.is_symlink() else -1
            entries.append((str(path.relative_to(root)), size))
    return sorted(entries)


def check_returned(args) -> bool:
    """The files under DIR now, and with them every name the session wrote there at some
    time (--written: a call cut short returns whatever is there at that moment)."""
    entries = listing(Path(args.dir))
    present = {path for path, _ in entries}
    gone = sorted(set(args.written) - present)
    problems = returned_file_problems(entries + [(path, 0) for path in gone])
    problems += [f"{path}: not a plain file" for path, size in entries if size < 0]
    for path, size in entries:
        print(f"  {path} ({size} bytes)")
    if gone:
        print("  written and gone again: " + " ".join(gone))
    if problems:
        print("returned files: NOT ALL WILL COME BACK: " + "; ".join(problems))
    else:
        print(f"returned files: {len(entries) + len(gone)} names of at most "
              f"{MAX_RETURNED_FILES}, all as the device tool returns them")
    return not problems


def archs_include(cuda_archs: str, arch: str) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST-style string ("8.0;9.0", "7.5+PTX", "9.0a") holds
    machine code for ``arch`` ("9.0") itself; PTX of an older arch does not count, since the
    session must time and sanitize the code compiled for the GPU it runs on."""
    entries = [e for e in re.split(r"[;, ]+", cuda_archs.strip()) if e]
    return any(re.sub(r"[af]$", "", e.replace("+PTX", "")) == arch for e in entries)


def visible_arch(_args) -> bool:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return False
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}")
    return True


def build_has_arch(args) -> bool:
    if args.archs is not None:  # the dry run: no build to import
        info = {"extension": True, "cuda_kernel": True, "cuda_archs": args.archs}
    else:
        import icd_fast

        info = icd_fast.build_info()
    if not info["extension"]:
        print(f"no usable build ({info.get('error', 'extension missing')})")
        return False
    if not info["cuda_kernel"]:
        print("the build has no CUDA kernel")
        return False
    if not archs_include(info["cuda_archs"], args.arch):
        print(f"the build's archs {info['cuda_archs']!r} lack {args.arch}")
        return False
    print(f"the build's archs {info['cuda_archs']!r} include {args.arch}")
    return True


def junit_verdict(args) -> bool:
    """pytest's counts from its JUnit XML. A skipped test fails the verdict: on the GPU
    machine every CUDA test must run (a skip there means no device or no CUDA build)."""
    try:
        root = ElementTree.parse(args.file).getroot()
    except (OSError, ElementTree.ParseError) as error:
        print(f"no test report ({error})")
        return False
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed_names = [f"{case.get('name')}" for s in suites for case in s.iter("testcase")
                    if case.find("failure") is not None or case.find("error") is not None]
    line = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")
    if failed_names:
        line += "; failing: " + ", ".join(failed_names[:8]) + (" ..." if len(failed_names) > 8 else "")
    print(line)
    return passed > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0


SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                               r"(\d+) warnings?\)")
SANITIZER_FRAME = re.compile(r"^=+\s+at (?:0x[0-9a-f]+ in )?([^\s(]+)", re.MULTILINE)
WORKLOAD_DONE = re.compile(r"^sanitize workload done: (.*)$", re.MULTILINE)


def sanitizer_verdict(args) -> bool:
    """compute-sanitizer's error count (racecheck's hazards, warnings included, where it
    prints its own summary), the kernels its reports name, and whether the workload ran to
    its end (a crash before it would otherwise read as "0 errors")."""
    try:
        text = Path(args.log).read_text(errors="replace")
    except OSError as error:
        print(f"no sanitizer log ({error})")
        return False
    summary = SANITIZER_SUMMARY.findall(text)
    races = RACECHECK_SUMMARY.findall(text)
    done = WORKLOAD_DONE.search(text)
    if not summary and not races:
        print("no ERROR SUMMARY line (the sanitizer did not finish)"
              + (f"; workload: {done.group(1)}" if done else "; workload did not finish"))
        return False
    errors = int(summary[-1]) if summary else 0
    line = f"{errors} errors"
    if races:
        hazards, race_errors, race_warnings = (int(x) for x in races[-1])
        errors += race_errors + race_warnings
        line = (f"{errors} errors ({hazards} racecheck hazards: {race_errors} errors, "
                f"{race_warnings} warnings)")
    kernels = sorted(set(SANITIZER_FRAME.findall(text)))
    if kernels:
        line += " in " + ", ".join(kernels[:6]) + (" ..." if len(kernels) > 6 else "")
    line += f"; workload: {done.group(1)}" if done else "; workload did not finish"
    # With the caching allocator on, memcheck misses small overruns inside its segments.
    caching_on = done is not None and "caching allocator on" in done.group(1)
    if caching_on:
        line += " (NOT a pass: the caching allocator was on)"
    print(line)
    return errors == 0 and done is not None and not caching_on


def bench_lines(args) -> bool:
    """One line per (dtype, N, D): each implementation's median and spread, and the fused
    kernel's speed-up against the others."""
    report = json.loads(Path(args.file).read_text())
    print(f"device {report['device_name']} (capability {report['capability']}), "
          f"torch {report['machine']['torch']}")
    configs = {}
    for row in report["results"]:
        configs.setdefault((row["dtype"], row["n"], row["d"]), {})[row["impl"]] = row
    failed = False
    for (dtype, n, d), rows in configs.items():
        failed |= any("error" in r for r in rows.values())
        timed = {impl: r for impl, r in rows.items() if "error" not in r}
        times = " ".join(f"{impl} {r['median_ms']:.3g} [{r['min_ms']:.3g}-{r['max_ms']:.3g}] ms"
                         for impl, r in timed.items())
        errors = " ".join(f"{impl} FAILED ({r['error'][:80]})" for impl, r in rows.items()
                          if impl not in timed)
        fused = timed.get("fused")
        ratios = " ".join(f"fused vs {impl} {r['median_ms'] / fused['median_ms']:.2f}x"
                          for impl, r in timed.items() if fused and impl != "fused")
        print(f"{dtype} N={n} D={d}: " + "; ".join(x for x in (times, errors, ratios) if x))
    return not failed


PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def ptxas_kernels(text: str) -> list:
    """(arch, kernel, registers, spill bytes, static shared bytes) from an nvcc build log
    made with -Xptxas -v (setup.py asks for it)."""
    kernels, current = [], None
    for line in text.splitlines():
        entry = PTXAS_ENTRY.search(line)
        if entry:
            current = {"kernel": entry.group(1), "arch": entry.group(2), "spill": 0}
            continue
        if current is None:
            continue
        spills = PTXAS_SPILLS.search(line)
        if spills:
            current["spill"] = int(spills.group(1)) + int(spills.group(2))
        used = PTXAS_USED.search(line)
        if used:
            kernels.append((current["arch"], current["kernel"], int(used.group(1)),
                            current["spill"], int(used.group(2) or 0)))
            current = None
    return kernels


def ptxas_report(args) -> bool:
    """Every kernel's registers, spills and shared memory from the build log, then one
    line: the most registers and which kernels spill."""
    kernels = ptxas_kernels(Path(args.log).read_text(errors="replace"))
    if not kernels:
        print("no ptxas report in the build log (no CUDA compilation in it)")
        return False
    names = {kernel: kernel for _, kernel, *_ in kernels}
    if shutil.which("c++filt"):
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                                   text=True).stdout.splitlines()
        if len(demangled) == len(names):
            names = dict(zip(names, demangled))
    for arch, kernel, registers, spill, smem in kernels:
        print(f"  {arch} {registers:>3} registers {spill:>5} spill bytes {smem:>6} smem bytes  "
              f"{names[kernel][:150]}", file=sys.stderr)
    arch, kernel, registers, _, _ = max(kernels, key=lambda k: k[2])
    spilling = [k for k in kernels if k[3] > 0]
    print(f"ptxas: {len(kernels)} kernels, at most {registers} registers ({arch} "
          f"{names[kernel][:80]}); " + (f"{len(spilling)} spill" if spilling else "no spills"))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("visible-arch").set_defaults(run=visible_arch)
    has = commands.add_parser("build-has-arch")
    has.add_argument("arch")
    has.add_argument("--archs", default=None, help="check this arch list instead of the build's")
    has.set_defaults(run=build_has_arch)
    junit = commands.add_parser("junit-verdict")
    junit.add_argument("file")
    junit.set_defaults(run=junit_verdict)
    sanitizer = commands.add_parser("sanitizer-verdict")
    sanitizer.add_argument("log")
    sanitizer.set_defaults(run=sanitizer_verdict)
    bench = commands.add_parser("bench-lines")
    bench.add_argument("file")
    bench.set_defaults(run=bench_lines)
    ptxas = commands.add_parser("ptxas-report")
    ptxas.add_argument("log")
    ptxas.set_defaults(run=ptxas_report)
    returned = commands.add_parser("check-returned")
    returned.add_argument("dir")
    returned.add_argument("--written", nargs="*", default=[],
                          help="names (relative to DIR) written there at any time")
    returned.set_defaults(run=check_returned)
    args = parser.parse_args(argv)
    return 0 if args.run(args) else 1


if __name__ == "__main__":
    sys.exit(main())
