"""The project's own claims about its checks: CI's command, the Python versions, the minimums."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself needs tomli on Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

pytestmark = pytest.mark.skipif(
    not (ROOT / ".ci" / "run").is_file(), reason="runs in a source checkout, not from an sdist"
)


def _commands(text: str) -> list[str]:
    """Return the shell lines of ``text``: no comment lines, no trailing comments."""
    lines = (line.split("  #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's second command is, exactly, the command .ci/run ends with."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    readme_commands = _commands(block[1])
    ci_commands = _commands((ROOT / ".ci" / "run").read_text())
    assert readme_commands[1] == ci_commands[-1]


def test_classifiers_name_every_version_from_the_minimum_on() -> None:
    """The Python classifiers start at requires-python's minimum and skip no version."""
    minimum = re.fullmatch(r">=3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum is not None
    minors = [
        int(c.rpartition(".")[2])
        for c in PYPROJECT["project"]["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert minors == list(range(int(minimum[1]), int(minimum[1]) + len(minors)))


def test_every_runtime_requirement_has_a_lower_bound() -> None:
    """Each dependency and extra says name>=version, so nox -s minimums can pin and test it."""
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    for requirement in requirements:
        # An environment marker may follow (uvloop: not on Windows).
        spec = r"[A-Za-z0-9_.-]+(\[[^]]*\])?>=[0-9][0-9A-Za-z.]*(\s*;.*)?"
        assert re.fullmatch(spec, requirement), requirement
