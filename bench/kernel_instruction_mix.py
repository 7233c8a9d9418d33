"""Instruction mix of the CUDA kernels' hot loops, read from the built extension's SASS.

A static check that needs no GPU: for each kernel, every innermost loop (a backward branch)
that holds at least 16 multiply-adds is listed with its instruction count, its FMAs (FFMA,
DFMA; HMMA for the tensor cores) and its shared-memory loads by width. On the CUDA-core path
the ratio of shared loads to FMAs is what bounds the products (one LDS wavefront per clock
per SM against four warps' FMAs), so it is the number to watch when the tiles change.
It does not time anything: speed is measured by bench_icd_loss.py on a GPU.

    python bench/kernel_instruction_mix.py                 # sm_90 SASS of icd_fast._C
    python bench/kernel_instruction_mix.py --arch sm_80 --kernels Simt
    python bench/kernel_instruction_mix.py --sass dump.txt # a saved `cuobjdump -sass` listing

cuobjdump is looked for on PATH, under CUDA_HOME/bin, and in Triton's bundled CUDA tools.
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

FMA_OPS = ("FFMA", "DFMA", "HFMA2")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    try:
        import triton

        candidates += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                             "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("cuobjdump not found: put it on PATH or set CUDA_HOME")


def extension_path():
    import icd_fast._C as extension  # the built extension, not the package's Python

    return extension.__file__


def sass_of(library, arch):
    result = subprocess.run([find_cuobjdump(), "-sass", "-arch", arch, library],
                            capture_output=True, text=True)
    if result.returncode != 0 or "Function :" not in result.stdout:
        raise SystemExit(f"cuobjdump found no {arch} code in {library}: "
                         f"{result.stderr.strip() or 'no functions listed'}")
    return result.stdout


def demangled_kernel(name):
    """'forward_kernel<SimtProducts<float>, float>'-like short name of a mangled kernel."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return name
    out = out.replace("icd_fast::cuda::", "").replace("c10::", "")
    out = re.sub(r"^void ", "", out)
    return re.sub(r"\(.*\)$", "", out) or name


def loop_mix(body):
    counts = collections.Counter(op.split(".")[0] for _, op, _ in body)
    shared_loads = collections.Counter(op for _, op, _ in body if op.startswith("LDS"))
    fma = sum(counts[o] for o in FMA_OPS)
    return {"instructions": len(body), "fma": fma, "hmma": counts["HMMA"],
            "shared_loads": dict(shared_loads),
            "lds_per_fma": sum(shared_loads.values()) / fma if fma else None}


def is_product_loop(mix, min_fma):
    # Multiply-adds fed from shared memory (CUDA cores), or tensor-core mmas.
    return mix["hmma"] > 0 or (mix["fma"] >= min_fma and mix["shared_loads"])


def hot_loops(function_text, min_fma=16):
    """The innermost product loops of one function (a loop = a backward branch's range)."""
    instructions = [(int(a, 16), op, args) for a, op, args in INSTRUCTION.findall(function_text)]
    index = {address: k for k, (address, _, _) in enumerate(instructions)}
    loops = []
    for k, (address, op, args) in enumerate(instructions):
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            first = index[int(target.group(1), 16)]
            mix = loop_mix(instructions[first:k + 1])
            if is_product_loop(mix, min_fma):
                loops.append((first, k, mix))
    # Keep the loops that hold no other product loop.
    return [mix for first, last, mix in loops
            if not any(f >= first and l <= last and (f, l) != (first, last)
                       for f, l, _ in loops)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--library", help="shared library to read (default: icd_fast._C)")
    parser.add_argument("--sass", help="a saved cuobjdump -sass listing instead of a library")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)

    text = open(args.sass).read() if args.sass else sass_of(args.library or extension_path(),
                                                           args.arch)
    print(f"{'kernel':<62} {'instr':>5} {'FMA':>4} {'HMMA':>4}  shared loads        LDS/FMA")
    for function in re.split(r"\n\s*Function : ", text)[1:]:
        mangled = function.split("\n", 1)[0].strip()
        if args.kernels not in mangled:
            continue
        name = demangled_kernel(mangled)
        for loop in hot_loops(function):
            loads = ", ".join(f"{v} {k}" for k, v in sorted(loop["shared_loads"].items()))
            ratio = f"{loop['lds_per_fma']:.2f}" if loop["lds_per_fma"] is not None else "-"
            print(f"{name[:62]:<62} {loop['instructions']:>5} {loop['fma']:>4} "
                  f"{loop['hmma']:>4}  {loads:<19} {ratio:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
