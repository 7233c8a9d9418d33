"""The GPU session script and its helpers, without a GPU: bench/gpu_session.sh's dry run
(stage logic, the files it leaves under $OUT against the device tool's rules), the verdicts
of bench/gpu_session_tools.py, and CPU smoke runs of the quick benchmark and the sanitizer
workload."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_session_tools as tools  # noqa: E402
import sanitize_workload  # noqa: E402

# What the issue asks for, written here rather than read from the script.
STAGES = {"quick", "sanitize", "bench-full", "no-tensor-core-build"}
STEPS = {"quick": ["build", "tests", "bench"],
         "sanitize": ["memcheck", "racecheck", "initcheck", "synccheck"],
         "bench-full": ["float32", "bfloat16"],
         "no-tensor-core-build": ["build", "tests"]}
NAME_RULE = re.compile(r"^[A-Za-z0-9._-]+$")


def session(tmp_path, *args, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), GPU_SESSION_DRY_RUN="1", PYTHON=sys.executable,
                    TMPDIR=str(tmp_path), **env)
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=120)
    return result, out


def summary_lines(out):
    return (out / "summary.txt").read_text().splitlines()


def verdict(lines, step):
    found = [line.split(": ", 2)[1].split()[0] for line in lines if line.startswith(step + ": ")]
    assert len(found) == 1, (step, lines)
    return found[0]


def assert_returnable(out):
    """Every file under out as the device tool would return it, checked here by hand."""
    files = [p for p in out.rglob("*") if not p.is_dir()]
    assert 0 < len(files) <= 8, files
    for path in files:
        parts = path.relative_to(out).parts
        assert len(parts) - 1 <= 2, path
        assert all(NAME_RULE.match(part) for part in parts), path
        assert path.is_file() and not path.is_symlink(), path


def test_every_stage_is_listed_with_its_expected_seconds():
    listed = subprocess.run(["bash", str(SCRIPT), "--list-stages"], capture_output=True,
                            text=True, check=True).stdout.split("\n")
    stages = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in listed if line}
    assert set(stages) == STAGES
    assert all(0 <= minimum <= expected <= 600 for expected, minimum in stages.values())
    # The recommended first call, quick then sanitize, fits one 10-minute device call.
    assert stages["quick"][0] + stages["sanitize"][0] <= 570


def test_dry_run_reaches_every_stage_and_leaves_only_returnable_files(tmp_path):
    result, out = session(tmp_path, "all")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = summary_lines(out)
    for stage, steps in STEPS.items():
        for step in steps:
            assert verdict(lines, f"{stage}:{step}") == "PASS"
    assert_returnable(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "bench-full-bfloat16.json", "bench-full-float32.json", "logs.tar.gz",
        "quick-bench.json", "summary.txt"]
    # The names written and removed again (the live log, the archive's temporary) count too.
    assert any(line.startswith("returned files: 7 names of at most 8") for line in lines), lines
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = {Path(name).name for name in archive.getnames()}
    assert {f"{stage}-{step}.log" for stage, steps in STEPS.items() for step in steps} <= logs


def test_the_rules_catch_a_plus_a_ninth_file_a_deep_folder_and_a_large_file():
    good = [("summary.txt", 10), ("logs.tar.gz", 10), ("a/b/c.json", 10)]
    assert tools.returned_file_problems(good) == []
    assert tools.returned_file_problems([("cuda-float32-torch2.11.0+cu130.json", 1)])
    assert tools.returned_file_problems([(f"file{i}.txt", 1) for i in range(9)])
    assert not tools.returned_file_problems([(f"file{i}.txt", 1) for i in range(8)])
    assert tools.returned_file_problems([("a/b/c/d.txt", 1)])
    assert tools.returned_file_problems([("big.json", 16 * 2**20 + 1)])
    assert tools.returned_file_problems([("a b.txt", 1)])


def test_check_returned_fails_on_a_file_the_tool_would_drop(tmp_path):
    (tmp_path / "summary.txt").write_text("x")
    assert tools.main(["check-returned", str(tmp_path)]) == 0
    assert tools.main(["check-returned", str(tmp_path), "--written", "test+cu130.log"]) == 1
    (tmp_path / "test-2.11.0+cu130.log").write_text("x")
    assert tools.main(["check-returned", str(tmp_path)]) == 1


def test_a_failed_step_does_not_stop_the_later_ones(tmp_path):
    result, out = session(tmp_path, "sanitize", "bench-full",
                          GPU_SESSION_DRY_RUN_FAIL="quick:tests sanitize:memcheck")
    assert result.returncode == 1
    lines = summary_lines(out)
    assert verdict(lines, "quick:tests") == "FAIL"
    assert verdict(lines, "sanitize:memcheck") == "FAIL"
    for step in ("quick:bench", "sanitize:racecheck", "sanitize:initcheck",
                 "sanitize:synccheck", "bench-full:float32", "bench-full:bfloat16"):
        assert verdict(lines, step) == "PASS"


def test_a_session_cut_short_returns_what_it_did(tmp_path):
    result, out = session(tmp_path, "sanitize", GPU_SESSION_DRY_RUN_CUT="sanitize:racecheck")
    assert result.returncode != 0
    lines = summary_lines(out)
    assert verdict(lines, "quick:tests") == "PASS"
    assert verdict(lines, "sanitize:memcheck") == "PASS"
    assert not [line for line in lines if line.startswith("sanitize:racecheck")]
    assert "--tool racecheck" in (out / "running.log").read_text()
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert "logs/sanitize-memcheck.log" in archive.getnames()
    assert_returnable(out)


def test_a_stage_that_does_not_fit_the_budget_is_skipped_and_says_how_to_run_it(tmp_path):
    # 150 s: 135 s left after the reserve, enough to start sanitize (75) and bench-full (100)
    # but not the scratch build (200).
    result, out = session(tmp_path, "all", GPU_SESSION_BUDGET_S="150")
    lines = summary_lines(out)
    assert verdict(lines, "quick:bench") == "PASS"
    assert verdict(lines, "sanitize:synccheck") == "PASS"
    assert verdict(lines, "bench-full:bfloat16") == "PASS"
    skipped = [line for line in lines if line.startswith("no-tensor-core-build: SKIPPED")]
    assert skipped and "--no-quick no-tensor-core-build" in skipped[0]
    assert result.returncode == 0


def test_steps_past_the_budget_end_as_timeouts(tmp_path):
    # Nothing left after the reserve: quick still starts (its build kept), and each step
    # reports the timeout.
    result, out = session(tmp_path, GPU_SESSION_BUDGET_S="10",
                          GPU_SESSION_DRY_RUN_BUILT_ARCHS="9.0")
    lines = summary_lines(out)
    assert verdict(lines, "quick:build") == "PASS"
    assert verdict(lines, "quick:tests") == "TIMEOUT"
    assert verdict(lines, "quick:bench") == "TIMEOUT"
    assert result.returncode == 1


@pytest.mark.parametrize("built, rebuilt", [("8.0", True), ("8.0;9.0", False),
                                            ("7.5+PTX", True), ("9.0a", False)])
def test_the_build_is_redone_only_when_it_lacks_the_gpus_arch(tmp_path, built, rebuilt):
    _, out = session(tmp_path, GPU_SESSION_DRY_RUN_BUILT_ARCHS=built)
    build = next(line for line in summary_lines(out) if line.startswith("quick:build: "))
    assert ("built for 9.0" in build) == rebuilt, build
    assert ("kept" in build) == (not rebuilt), build
    log = (tmp_path / "log")
    with tarfile.open(out / "logs.tar.gz") as archive:
        archive.extract("logs/quick-build.log", log)
    assert ('TORCH_CUDA_ARCH_LIST=9.0' in (log / "logs" / "quick-build.log").read_text()) == rebuilt


def test_arch_lists():
    assert tools.archs_include("8.0;9.0", "9.0")
    assert tools.archs_include("9.0+PTX", "9.0")
    assert tools.archs_include("8.0 9.0a", "9.0")
    assert not tools.archs_include("7.5+PTX", "9.0")  # JIT-compiled PTX is not the GPU's code
    assert not tools.archs_include("8.0", "8.6")
    assert not tools.archs_include("", "9.0")
    assert not tools.archs_include("9.0", "10.0")


def test_an_unknown_stage_is_one_line_on_stderr_and_status_2(tmp_path):
    result, out = session(tmp_path, "sanitise")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "sanitise" in result.stderr
    assert not out.exists()


def test_the_session_needs_no_git_checkout():
    # The device receives a copy of the tree that may lack .git.
    code = [line.split("#")[0] for line in SCRIPT.read_text().splitlines()]
    assert not [line for line in code if re.search(r"(?<![\w./-])git\s", line)]


def junit(tmp_path, **counts):
    path = tmp_path / "report.xml"
    cases = "".join(f'<testcase name="t{i}"/>' for i in range(counts.get("tests", 0)))
    attrs = " ".join(f'{key}="{value}"' for key, value in counts.items())
    path.write_text(f'<testsuites><testsuite name="pytest" {attrs}>{cases}</testsuite></testsuites>')
    return str(path)


def test_junit_verdict_fails_on_failures_skips_and_empty_runs(tmp_path, capsys):
    assert tools.main(["junit-verdict", junit(tmp_path, tests=5, failures=0, errors=0, skipped=0)]) == 0
    assert "5 passed" in capsys.readouterr().out
    assert tools.main(["junit-verdict", junit(tmp_path, tests=5, failures=1, errors=0, skipped=0)]) == 1
    assert tools.main(["junit-verdict", junit(tmp_path, tests=5, failures=0, errors=0, skipped=5)]) == 1
    assert tools.main(["junit-verdict", junit(tmp_path, tests=0, failures=0, errors=0, skipped=0)]) == 1
    assert tools.main(["junit-verdict", str(tmp_path / "missing.xml")]) == 1


SANITIZER_CLEAN = """========= COMPUTE-SANITIZER
sanitize workload done: 40 cases on cuda, caching allocator off, row-range ops absent
========= ERROR SUMMARY: 0 errors
"""
SANITIZER_ERROR = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at icd_fast::row_stats_kernel<float>(const float *, int)+0x1a0
=========     by thread (3,0,0) in block (1,0,0)
sanitize workload done: 40 cases on cuda, caching allocator off, row-range ops absent
========= ERROR SUMMARY: 1 error
"""


def test_sanitizer_verdict(tmp_path, capsys):
    log = tmp_path / "sanitizer.log"
    log.write_text(SANITIZER_CLEAN)
    assert tools.main(["sanitizer-verdict", str(log)]) == 0
    log.write_text(SANITIZER_ERROR)
    assert tools.main(["sanitizer-verdict", str(log)]) == 1
    assert "icd_fast::row_stats_kernel<float>" in capsys.readouterr().out
    # A workload that died before its last line is no pass, whatever the count says.
    log.write_text(SANITIZER_CLEAN.replace("sanitize workload done", "Traceback"))
    assert tools.main(["sanitizer-verdict", str(log)]) == 1
    log.write_text(SANITIZER_CLEAN.replace("allocator off", "allocator on"))
    assert tools.main(["sanitizer-verdict", str(log)]) == 1
    log.write_text("========= COMPUTE-SANITIZER\n")  # killed before its summary
    assert tools.main(["sanitizer-verdict", str(log)]) == 1
    capsys.readouterr()
    # racecheck's own summary: its warnings (potential hazards) fail the verdict too.
    done = "sanitize workload done: 40 cases on cuda\n"
    log.write_text(done + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert tools.main(["sanitizer-verdict", str(log)]) == 0
    log.write_text(done + "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n"
                   "========= ERROR SUMMARY: 0 errors\n")
    assert tools.main(["sanitizer-verdict", str(log)]) == 1
    assert "2 warnings" in capsys.readouterr().out


def test_quick_benchmark_json_on_the_cpu(tmp_path, capsys):
    import bench_gpu_quick

    out = tmp_path / "quick.json"
    assert bench_gpu_quick.main(["--device", "cpu", "--sizes", "8", "20", "--dtypes", "float32",
                                 "bfloat16", "--impls", "fused", "eager", "--seconds", "0.05",
                                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device_name"] == "cpu" and report["machine"]["torch"] == torch.__version__
    configs = {(r["dtype"], r["n"], r["impl"]) for r in report["results"]}
    assert configs == {(dtype, n, impl) for dtype in ("float32", "bfloat16") for n in (8, 20)
                       for impl in ("fused", "eager")}
    for r in report["results"]:
        assert r["d"] == 128 and r["repeats"] == len(r["samples_ms"]) >= 5
        assert r["min_ms"] == min(r["samples_ms"]) and r["max_ms"] == max(r["samples_ms"])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert tools.main(["bench-lines", str(out)]) == 0
    assert "float32 N=8 D=128: fused" in capsys.readouterr().out


def test_sanitizer_workload_covers_every_precision_and_layout():
    cases = list(sanitize_workload.cases())
    pairs = {(precision[0], layout) for precision, *_, layout in cases}
    assert pairs == {(p[0], layout) for p in sanitize_workload.PRECISIONS
                     for layout in sanitize_workload.LAYOUTS}
    assert {p[0] for p in sanitize_workload.PRECISIONS} == {
        "float32", "float64", "float16", "bfloat16", "tf32"}
    assert {(theta, max_scale) for _, _, _, theta, max_scale, _ in cases} == set(
        sanitize_workload.SCALES)
    # Both exponent paths: kappa under 32 (the fixed shift) and over it (the online maximum).
    kappas = [min(torch.tensor(theta).exp().item(), cap) for theta, cap in sanitize_workload.SCALES]
    assert min(kappas) < 32 < max(kappas)


def test_sanitizer_workload_inputs_are_made_in_their_layouts():
    gen = torch.Generator().manual_seed(0)
    strided = sanitize_workload.strided(5, 3, torch.float32, torch.device("cpu"), gen)
    assert strided.shape == (5, 3) and strided.stride() == (6, 2)
    transposed = sanitize_workload.transposed(5, 3, torch.float32, torch.device("cpu"), gen)
    assert transposed.shape == (5, 3) and transposed.stride() == (1, 5)
    misaligned = sanitize_workload.misaligned(5, 4, torch.float32, torch.device("cpu"), gen)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0


def test_sanitizer_workload_runs_on_the_cpu_kernel():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_workload.py"),
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    assert re.search(r"sanitize workload done: 40 cases on cpu, caching allocator off",
                     result.stdout), result.stdout


def test_bench_lines_report_a_failed_timing_and_fail(tmp_path, capsys):
    row = {"dtype": "float32", "n": 64, "d": 128, "median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0}
    report = {"device_name": "GPU", "capability": "9.0", "machine": {"torch": "x"},
              "results": [dict(row, impl="fused"), dict(row, impl="eager", median_ms=8.0),
                          {"dtype": "float32", "n": 64, "d": 128, "impl": "compile",
                           "error": "RuntimeError: out of memory"}]}
    path = tmp_path / "quick.json"
    path.write_text(json.dumps(report))
    assert tools.main(["bench-lines", str(path)]) == 1
    printed = capsys.readouterr().out
    assert "compile FAILED (RuntimeError: out of memory)" in printed
    assert "fused vs eager 4.00x" in printed


def test_ptxas_report_reads_registers_spills_and_shared_memory():
    log = (ROOT / "tests" / "fixtures" / "ptxas_verbose_sm90.log").read_text()
    assert tools.ptxas_kernels(log) == [("sm_90", "_Z5scaleIdEvPT_i", 12, 0, 2048),
                                        ("sm_90", "_Z5scaleIfEvPT_i", 10, 0, 1024)]
    # A spill in the float kernel only (stores and loads both count).
    spilled = log.replace("_Z5scaleIfEvPT_i\n    0 bytes stack frame, 0 bytes spill stores, "
                          "0 bytes spill loads",
                          "_Z5scaleIfEvPT_i\n    8 bytes stack frame, 8 bytes spill stores, "
                          "4 bytes spill loads")
    assert spilled != log
    assert [k[3] for k in tools.ptxas_kernels(spilled)] == [0, 12]


def test_ptxas_report_line(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text((ROOT / "tests" / "fixtures" / "ptxas_verbose_sm90.log").read_text())
    assert tools.main(["ptxas-report", str(log)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ptxas: 2 kernels, at most 12 registers (sm_90 ") and line.endswith(
        "no spills")
    log.write_text("building the CPU kernel only\n")
    assert tools.main(["ptxas-report", str(log)]) == 1


def test_sanitizer_workload_runs_the_row_range_ops():
    # On the CPU kernel, which has them: every range of every precision, checked for finite
    # results by the ops' own callers elsewhere; here that the workload reaches them all.
    status = sanitize_workload.row_range_status(torch.device("cpu"), torch.Generator())
    assert status == f"row-range ops ran {4 * len(sanitize_workload.ROW_RANGES)} ranges"


def test_sanitizer_workload_says_when_the_row_range_ops_are_absent():
    class NoRowOps:
        icd_forward = torch.ops.icd_fast.icd_forward

    status = sanitize_workload.row_range_status(torch.device("cpu"), torch.Generator(), NoRowOps)
    assert status == "row-range ops absent from this build (not sanitized)"
