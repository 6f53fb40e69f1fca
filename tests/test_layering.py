"""The library (what a user drops into their own loop) never imports the application."""
import ast
from pathlib import Path

import orthomod

PACKAGE = Path(orthomod.__file__).parent
LIBRARY = {"init", "regularizers", "modulation", "models", "imagenet_models", "diagnostics", "layers", "tat", "weights"}
APPLICATION = {"train", "data", "folder_data", "cli", "report", "config", "files", "hardware", "distributed",
               "errors", "__main__"}


def _orthomod_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("orthomod."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("orthomod."))
    return found


def test_every_module_is_classified():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == LIBRARY | APPLICATION


def test_library_imports_only_library():
    for module in sorted(LIBRARY | {"__init__"}):
        assert _orthomod_imports(module) <= LIBRARY, module


def test_the_checker_sees_imports():
    assert {"config", "data", "hardware", "files"} <= _orthomod_imports("train")
