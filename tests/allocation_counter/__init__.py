"""Measures the bytes the fused loss allocates, in a child process run under a counting malloc.

The counter (counting_malloc.c, loaded with LD_PRELOAD) sees every allocation, whoever makes
it: torch's CPU allocator, operator new, std::vector and BLAS alike. The child sets the thread
count, warms up (so that thread pools and BLAS buffers already exist), then reports the peak
of live bytes above the level before the call.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


class CompilerMissing(RuntimeError):
    pass


def build_counting_malloc(out_dir: str) -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CompilerMissing("no C compiler (cc or gcc) on PATH to build the counting malloc")
    library = os.path.join(out_dir, "counting_malloc.so")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", library,
                    os.path.join(HERE, "counting_malloc.c")], check=True)
    return library


def measure_icd_allocations(n: int, d: int, threads: int, dtype: str = "float32") -> dict:
    """Peak bytes above the starting level during the fused loss's forward, and during forward
    plus backward, at ``threads`` torch threads, with N x D inputs of ``dtype``. Keys:
    forward_peak_bytes, forward_kept_bytes (the saved tensors), step_peak_bytes."""
    with tempfile.TemporaryDirectory(prefix="icd_alloc_") as tmp:
        library = build_counting_malloc(tmp)
        env = dict(os.environ, LD_PRELOAD=library,
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, "probe.py"), str(n), str(d), str(threads), dtype],
            env=env, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"allocation probe failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
