"""The README's library example runs as written, and its commands name things that exist."""
import re
from pathlib import Path

from orthomod.config import list_presets

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor(" in printed and "[" in printed


def test_presets_named_in_readme_exist():
    named = set(re.findall(r"--config ([a-z0-9-]+)", README.read_text()))
    assert named and named <= set(list_presets())
