"""The training application's layout rules that a grep can check: one module owns the run
folder's file names."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Each name as it would appear in a path; "probe-" not as part of an option (--probe-lr).
RUN_FOLDER_NAMES = {name: re.compile(r"(^|[^-\w])" + re.escape(name))
                    for name in ("last.pt", "best.pt", "log.csv", "run.json", "probe-")}


def code_strings(path: Path):
    """The string constants of a module's code, docstrings left out (comments are not in the
    tree at all)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.value


def test_the_run_folders_file_names_are_spelled_in_one_module():
    owners = {}
    for path in sorted((ROOT / "train").rglob("*.py")):
        for text in code_strings(path):
            for name, pattern in RUN_FOLDER_NAMES.items():
                if pattern.search(text):
                    owners.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert owners == {name: {"train/run_folder.py"} for name in RUN_FOLDER_NAMES}, owners


def test_the_check_sees_a_file_name_in_code(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Reads log.csv."""\n# best.pt\nPATH = "runs/last.pt"\nOPT = "--probe-lr"\n')
    found = [t for t in code_strings(module) for p in RUN_FOLDER_NAMES.values() if p.search(t)]
    assert found == ["runs/last.pt"]
