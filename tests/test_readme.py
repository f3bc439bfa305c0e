"""The README's Python examples run as written (they are the first code a
user copies). A block that does not start with an import continues the
block before it."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _programs() -> list[str]:
    programs: list[str] = []
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        if block.startswith(("from ", "import ")) or not programs:
            programs.append(block)
        else:
            programs[-1] += block
    return programs


PROGRAMS = _programs()


def test_the_readme_has_examples() -> None:
    assert len(PROGRAMS) >= 3


@pytest.mark.parametrize("index", range(len(PROGRAMS)))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files (a pcap tap)
    code = compile(PROGRAMS[index], f"README.md program {index + 1}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"__name__": f"readme_example_{index + 1}"})
