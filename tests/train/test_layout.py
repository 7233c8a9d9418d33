"""The training application's layout rules that a grep can check: one module owns the run
folder's file names; the command line's options stop at train/cli.py."""
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


# The one module that may hold the argparse Namespace, and the one that may name argparse
# otherwise: checkpoints.py lists argparse.Namespace among the classes a checkpoint file may
# hold (the CRD benchmark pickles its options there), a data type, not the command line.
COMMAND_LINE = "train/cli.py"
NAMESPACE_IN_CHECKPOINTS = "train/checkpoints.py"


def namespace_uses(path: Path):
    """Where a module reaches for the command line: an argparse import, the name Namespace,
    a parameter called args (not *args), or args.x / getattr(args, ...)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
            found.append(f"{where}: import argparse")
        elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
            found.append(f"{where}: from argparse import")
        elif isinstance(node, ast.Name) and node.id == "Namespace" \
                or isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(f"{where}: Namespace")
        elif isinstance(node, ast.arg) and node.arg == "args":
            found.append(f"{where}: a parameter called args")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "args":
            found.append(f"{where}: args.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "vars") and node.args \
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
            found.append(f"{where}: {node.func.id}(args, ...)")
    # *args is a function's own positional rest, not the command line.
    varargs = {f"line {n.lineno}: a parameter called args" for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
               and n.args.vararg is not None and n.args.vararg.arg == "args"}
    return [f for f in found if f not in varargs]


def test_no_module_below_the_command_line_touches_a_namespace():
    offenders = {}
    for path in sorted((ROOT / "train").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name == COMMAND_LINE:
            continue
        uses = namespace_uses(path)
        if name == NAMESPACE_IN_CHECKPOINTS:
            uses = [u for u in uses if not u.endswith(("import argparse", ": Namespace"))]
        if uses:
            offenders[name] = uses
    assert offenders == {}, offenders
    # The exception is as narrow as it says: checkpoints.py does name the class.
    assert namespace_uses(ROOT / NAMESPACE_IN_CHECKPOINTS) and namespace_uses(
        ROOT / COMMAND_LINE)


def test_the_namespace_check_sees_each_way_in(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import argparse\nfrom argparse import Namespace\n\n\n"
        "def run(args, *rest):\n    return args.config, getattr(args, 'seed', 0)\n\n\n"
        "def say(*args):\n    print(*args)\n")
    assert sorted(namespace_uses(module)) == [
        "line 1: import argparse", "line 2: from argparse import",
        "line 5: a parameter called args", "line 6: args.config", "line 6: getattr(args, ...)"]
