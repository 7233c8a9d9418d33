"""Registers, spills, shared memory and blocks per SM of every CUDA kernel, and the grid the
tile kernels launch at each N: a static check from the build, no GPU needed.

setup.py compiles the kernels with `-Xptxas=-v`, so its log holds one ptxas report per kernel
and arch. Blocks per SM follow from registers (65536 per SM, allocated per warp in units of
256), static shared memory (plus 1 KB the runtime reserves per block), threads (2048 per SM)
and the 32-block limit. The grid of the forward and backward tile kernels is
ceil(N/32) row tiles x the column splits that bring it up to two blocks per SM
(column_split() in csrc/cuda/icd_cuda_launch.h, mirrored below).

    MAX_JOBS=2 python setup.py build_ext --inplace 2>&1 | tee build.log
    python bench/kernel_occupancy.py build.log                 # every kernel, sm_80 and sm_90
    python bench/kernel_occupancy.py build.log --sizes 64 1024 4096 16384
"""
import argparse
import collections
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_instruction_mix import demangled_kernel  # noqa: E402

# Per-SM limits (CUDA C Programming Guide, "Compute Capabilities"), and the SM counts of the
# A100 (sm_80) and H100 SXM (sm_90).
ARCHS = {
    "sm_80": {"sms": 108, "smem": 164 * 1024},
    "sm_90": {"sms": 132, "smem": 228 * 1024},
}
REGISTERS_PER_SM, THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32
REGISTER_UNIT, RESERVED_SMEM_PER_BLOCK = 256, 1024
THREADS_PER_BLOCK, TILE_ROWS = 128, 32  # csrc/cuda/icd_tile_products.cuh, KernelTraits

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?(?:,|$)")


def parse_build_log(text):
    """{(kernel, arch): {"registers", "smem", "spill_stores", "spill_loads", "stack"}}."""
    kernels = {}
    current = None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = (m.group(1), m.group(2))
            kernels[current] = {"registers": None, "smem": 0, "spill_stores": 0,
                                "spill_loads": 0, "stack": 0}
        elif current and (m := SPILLS.search(line)):
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        elif current and "Used" in line and (m := USED.search(line)):
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[current].update(registers=int(m.group(1)),
                                    smem=int(smem.group(1)) if smem else 0)
            current = None
    return kernels


def blocks_per_sm(registers, smem, arch):
    warp_registers = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    warps = THREADS_PER_BLOCK // 32
    by_registers = (REGISTERS_PER_SM // warp_registers) // warps if warp_registers else 99
    by_smem = ARCHS[arch]["smem"] // (smem + RESERVED_SMEM_PER_BLOCK)
    return min(by_registers, by_smem, THREADS_PER_SM // THREADS_PER_BLOCK, MAX_BLOCKS_PER_SM)


def column_split(row_tiles, n, target_blocks):
    """(splits, tiles per split): csrc/cuda/icd_cuda_launch.h's column_split()."""
    tiles = math.ceil(n / TILE_ROWS)
    wanted = min(max((target_blocks + row_tiles // 2) // row_tiles, 1), tiles)
    per_split = math.ceil(tiles / wanted)
    return math.ceil(tiles / per_split), per_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build_log", help="output of setup.py build_ext (ptxas -v lines)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[64, 256, 1024, 4096, 8192, 16384, 65536])
    args = parser.parse_args(argv)
    kernels = parse_build_log(open(args.build_log, errors="replace").read())
    if not kernels:
        raise SystemExit(f"no ptxas reports in {args.build_log}: build with -Xptxas=-v "
                         "(setup.py does) and pass its full output")

    print(f"{'kernel':<70} {'arch':<6} {'regs':>4} {'smem':>6} {'spills':>7} {'blocks/SM':>9}")
    tile_blocks = collections.defaultdict(list)  # arch -> blocks/SM of the tile kernels
    for (name, arch), k in sorted(kernels.items(), key=lambda item: (demangled_kernel(item[0][0]),
                                                                      item[0][1])):
        if k["registers"] is None or arch not in ARCHS:
            continue
        per_sm = blocks_per_sm(k["registers"], k["smem"], arch)
        label = demangled_kernel(name)
        if label.startswith(("forward_kernel", "backward_kernel")):
            tile_blocks[arch].append(per_sm)
        spills = k["spill_stores"] + k["spill_loads"]
        print(f"{label[:70]:<70} {arch:<6} {k['registers']:>4} {k['smem']:>6} {spills:>7} "
              f"{per_sm:>9}")
    spilling = [demangled_kernel(n) + " " + a for (n, a), k in kernels.items()
                if k["spill_stores"] or k["spill_loads"]]
    print(f"\nkernels with spills: {len(spilling)}" + "".join(f"\n  {s}" for s in spilling))

    print("\nTile kernels' grid per N (forward and backward alike): row tiles x column splits;"
          "\n'waves' = blocks / (SMs x the fewest blocks per SM of any tile kernel), one wave"
          " or less when <= 1")
    print(f"{'N':>7} {'arch':<6} {'SMs':>4} {'row tiles':>9} {'splits':>6} {'blocks':>6} "
          f"{'SMs busy':>8} {'blocks/SM':>9} {'waves':>6}")
    for n in args.sizes:
        for arch, spec in ARCHS.items():
            row_tiles = math.ceil(n / TILE_ROWS)
            splits, _ = column_split(row_tiles, n, 2 * spec["sms"])
            blocks = row_tiles * splits
            fewest = min(tile_blocks[arch]) if tile_blocks[arch] else 1
            print(f"{n:>7} {arch:<6} {spec['sms']:>4} {row_tiles:>9} {splits:>6} {blocks:>6} "
                  f"{min(blocks, spec['sms']):>8} {blocks / spec['sms']:>9.2f} "
                  f"{blocks / (spec['sms'] * fewest):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
