"""Planted bugs against the CUDA emulation tests: which tests catch which bug.

    python tests/cuda_emulation/mutations.py                  every mutation, every test
    python tests/cuda_emulation/mutations.py fence-release tail-off-by-one
    python tests/cuda_emulation/mutations.py --list
    python tests/cuda_emulation/mutations.py -k "n257 or half" --table mutations.md

Each mutation replaces one snippet of csrc/cuda/ (or of the launcher) in a scratch copy of
csrc/ and tests/, rebuilds the emulated kernels there (one compile job) and runs
tests/ops/test_cuda_emul.py on it; an unmutated copy runs first as the baseline. A snippet that
no longer occurs exactly once stops the run: the mutation must be brought up to date with
the code. Prints a Markdown table: the tests that fail, by test function, out of those run.
A build takes a minute or two and the tests two to three; all mutations take a while.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_FILE = os.path.join("tests", "ops", "test_cuda_emul.py")
# What a scratch copy holds: the kernels, the emulation and the tests' helpers.
COPIED = ["csrc", os.path.join("tests", "cuda_emulation"), TEST_FILE,
          os.path.join("tests", "helpers.py"), os.path.join("tests", "conftest.py"),
          "pyproject.toml"]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    plants: str  # the bug, in words
    path: str    # relative to the repository
    old: str
    new: str


KERNELS = "csrc/cuda/icd_kernels.cuh"
PRODUCTS = "csrc/cuda/icd_tile_products.cuh"
LAUNCH = "csrc/cuda/icd_cuda_launch.h"

MUTATIONS = [
    Mutation("barrier-staging", "CUDA-core products: no barrier between staging a chunk and "
             "reading it", PRODUCTS,
             "      stage_rows<kChunk>(&sm.tj[0][0], kPitch, t, n, d, j0, c0);\n"
             "      __syncthreads();\n      for (int c = 0;",
             "      stage_rows<kChunk>(&sm.tj[0][0], kPitch, t, n, d, j0, c0);\n"
             "      for (int c = 0;"),
    Mutation("barrier-wmma-store", "tensor cores: no barrier between the accumulator store and "
             "reading the tile", PRODUCTS,
             "    wmma::store_matrix_sync(&sm.out_y[wi][wj], fy, kOutPitch, wmma::mem_row_major);\n"
             "    __syncthreads();\n",
             "    wmma::store_matrix_sync(&sm.out_y[wi][wj], fy, kOutPitch, wmma::mem_row_major);\n"),
    Mutation("tail-off-by-one", "forward: the ragged tail's column bound off by one",
             KERNELS, "if (!row_ok || j >= n) continue;",
             "if (!row_ok || j > n) continue;"),
    Mutation("transposed-operand", "tensor cores: the cosine's B operand read row-major",
             PRODUCTS, "wmma::fragment<wmma::matrix_b, 16, 16, kK, fragment_t, wmma::col_major> b;",
             "wmma::fragment<wmma::matrix_b, 16, 16, kK, fragment_t, wmma::row_major> b;"),
    Mutation("fp64-through-fp32", "CUDA-core products: each product rounded to fp32",
             PRODUCTS, "            x[m] += a.v[k] * tj.v[k];",
             "            x[m] += static_cast<float>(a.v[k] * tj.v[k]);"),
    # Padding every row with the same value (1, say) adds one constant to every logit, which
    # the loss and its gradients do not see: the planted padding differs from row to row,
    # as stale memory would (here: the row's own features again).
    Mutation("nonzero-padding", "tensor cores: operand copies padded with the row's own "
             "features instead of zeros", KERNELS, "has_row && k < d ? unit_row(k) : 0.f",
             "has_row ? unit_row(k % d) : 0.f"),
    Mutation("missing-pointer-check", "16-byte packs read without checking the rows' alignment",
             PRODUCTS, "d % Pack16<T>::kSize == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0",
             "d % Pack16<T>::kSize == 0"),
    Mutation("arch-check-removed", "tensor cores chosen whatever the device code was compiled "
             "for (the trap on a 7.5+PTX build)", LAUNCH,
             "return compiled_arch * 10 >= ICD_FAST_TENSOR_CORE_MIN_ARCH;", "return true;"),
    Mutation("upstream-scaling-removed", "logit-gradient tiles hold the upstream weights "
             "unscaled (fp16 overflow at 2^16)", KERNELS,
             "if (bound > 0 && std::isfinite(bound)) {", "if (false) {"),
    Mutation("fence-release-removed", "no __threadfence between a block's results and its "
             "counter increment", KERNELS,
             "  __threadfence();\n  __syncthreads();\n  if (threadIdx.x == 0) *flag",
             "  __syncthreads();\n  if (threadIdx.x == 0) *flag"),
    Mutation("fence-acquire-removed", "no __threadfence between the counter and the last "
             "block's reads", KERNELS, "  if (*flag) __threadfence();\n", ""),
    Mutation("first-block-reduces", "the first block to finish, not the last, reduces the "
             "scalars", KERNELS, "atomicAdd(blocks_done, 1u) == gridDim.x * gridDim.y - 1",
             "atomicAdd(blocks_done, 1u) == 0u"),
    Mutation("shared-read-before-write", "staging leaves out-of-range tile entries unwritten "
             "(read before any write)", PRODUCTS,
             "    tile[r * pitch + c] = (gr < n && col < d) ? rows[static_cast<int64_t>(gr) * d + col] : src_t(0);",
             "    if (gr < n && col < d) tile[r * pitch + c] = rows[static_cast<int64_t>(gr) * d + col];"),
    Mutation("row-weights-swapped", "backward: the column row j's terms read row i's "
             "upstream weights (one weight for all rows hides it; per-rank weights do not)",
             KERNELS, "const RowWeights<acc_t> w_j = w.of(j);",
             "const RowWeights<acc_t> w_j = w_i;"),
    Mutation("headroom-removed", "gradient tiles scaled so that their bound lands in [1, 2), "
             "not just below 2^15 (fp16 subnormals at large N)", KERNELS,
             "    exponent -= kTileBoundLog2;", "    exponent -= 1;"),
    Mutation("split-dropped", "the backward's merge launch leaves out the second column "
             "split's share of dS and dT", KERNELS,
             "for (int y = 1; y < p.split.splits; ++y) sum += grad",
             "for (int y = 2; y < p.split.splits; ++y) sum += grad"),
    Mutation("shuffle-mask-narrowed", "row merges shuffle with a mask of 4 lanes", KERNELS,
             "  return __shfl_xor_sync(0xffffffffu, v, lane_mask);",
             "  return __shfl_xor_sync(0x0000000fu, v, lane_mask);"),
]
BY_NAME = {m.name: m for m in MUTATIONS}


def scratch_copy(mutation: Mutation | None) -> str:
    root = tempfile.mkdtemp(prefix="icd_fast_mutation_")
    for item in COPIED:
        source, target = os.path.join(REPO, item), os.path.join(root, item)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(source):
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    if mutation is not None:
        path = os.path.join(root, mutation.path)
        with open(path) as f:
            text = f.read()
        found = text.count(mutation.old)
        if found != 1:
            shutil.rmtree(root)
            sys.exit(f"mutation {mutation.name}: its snippet occurs {found} times in "
                     f"{mutation.path} (expected once); update it to the current code")
        with open(path, "w") as f:
            f.write(text.replace(mutation.old, mutation.new))
    return root


@dataclasses.dataclass
class Outcome:
    built: bool
    run: int
    failed: dict  # test function -> failed parametrisations
    seconds: float
    log_tail: str


def run_tests(root: str, select: str | None) -> Outcome:
    report = os.path.join(root, "report.xml")
    env = dict(os.environ, MAX_JOBS="1", PYTHONPATH=REPO,
               ICD_FAST_EMUL_BUILD_DIR=os.path.join(root, "build"))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE,
               f"--junitxml={report}"]
    if select:
        command += ["-k", select]
    start = time.monotonic()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    log_tail = (done.stdout + done.stderr)[-3000:]
    if not os.path.exists(report):
        return Outcome(False, 0, {}, seconds, log_tail)
    cases = ElementTree.parse(report).getroot().iter("testcase")
    run, failed = 0, collections.defaultdict(int)
    build_failed = False
    for case in cases:
        if case.find("skipped") is not None:
            continue
        run += 1
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            if "Error building extension" in (problem.get("message", "") + (problem.text or "")):
                build_failed = True
            failed[re.sub(r"\[.*\]$", "", case.get("name"))] += 1
    return Outcome(not build_failed, run, dict(failed), seconds, log_tail)


def describe(outcome: Outcome) -> tuple[str, str]:
    if not outcome.built:
        return "does not compile", "-"
    total = sum(outcome.failed.values())
    tests = ", ".join(f"{name} ({count})" for name, count in sorted(outcome.failed.items()))
    return tests or "none", f"{total} of {outcome.run}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("-k", dest="select", help="pytest -k expression: run these tests only")
    parser.add_argument("--table", help="also write the Markdown table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not run the unmutated code first (when it just passed)")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28s} {m.plants}")
        return
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        sys.exit(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [BY_NAME[n] for n in args.names] or MUTATIONS

    header = ["| mutation | the planted bug | failing tests (parametrisations) | failed |",
              "|---|---|---|---|"]
    rows = []

    def emit(line: str) -> None:
        rows.append(line)
        print(line, flush=True)

    print("\n".join(header), flush=True)
    for mutation in chosen if args.skip_baseline else [None, *chosen]:
        root = scratch_copy(mutation)
        try:
            outcome = run_tests(root, args.select)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        name, plants = ("(none)", "the code as it is") if mutation is None else (
            f"`{mutation.name}`", mutation.plants)
        tests, count = describe(outcome)
        emit(f"| {name} | {plants} | {tests} | {count} |")
        if mutation is None and (not outcome.built or outcome.failed or outcome.run == 0):
            sys.exit("the unmutated code does not pass its tests; fix that first:\n"
                     + outcome.log_tail)
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
