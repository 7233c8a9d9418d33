"""The benchmark tables in docs/ are generated from bench/results/ (bench/tables.py), never
typed: the pages are up to date with their files, and a changed result changes the page."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import tables  # noqa: E402

PAGES = [ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "training.md"]


def test_every_table_block_names_a_results_file_and_is_up_to_date():
    blocks = [m for page in PAGES for m in tables.BLOCK.finditer(page.read_text())]
    assert len(blocks) >= 5
    for match in blocks:
        assert (ROOT / match.group("path")).is_file(), match.group("path")
    assert tables.main([str(p) for p in PAGES] + ["--check"]) == 0


def test_a_changed_result_changes_the_page(tmp_path):
    source = ROOT / "bench" / "results" / "cpu-memory-2026-12-01.json"
    report = json.loads(source.read_text())
    report["results"][0]["step_peak_in_ndx4"] = 9.87
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / source.name).write_text(json.dumps(report))
    page = f"<!-- table: bench/results/{source.name} -->\nold\n<!-- end table -->\n"
    fresh = tables.refresh(page, root=tmp_path)
    assert "| 4096 | 128 | 2 | 2.26 | 9.87 |" in fresh and "old" not in fresh
