"""The README's library example runs as written, and its commands name things that exist."""
import re
from pathlib import Path

from orthomod.config import list_presets

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_examples_run_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "README's two python examples: the library, and the loop with AdamW/clipping/scaler"
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor(" in printed and "[" in printed
    exec(compile(blocks[1], "README.md", "exec"), {})
    assert "'step_count': 2, 'tau': 1.0, 'until_step': None, 'rule': 'consecutive'" in capsys.readouterr().out


def test_presets_named_in_readme_exist():
    named = set(re.findall(r"--config ([a-z0-9-]+)", README.read_text()))
    assert named and named <= set(list_presets())
