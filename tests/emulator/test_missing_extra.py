"""Without the emulator extra (no cryptography), every way in says which extra to install."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

INSTALL = "pip install 'iampg[emulator]'"

# Makes cryptography unimportable in the child, as on a machine without the extra.
BLOCKER = textwrap.dedent(
    """
    import sys

    class NoCryptography:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "cryptography":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoCryptography())
    """
)


def installed() -> bool:
    """Tell whether pytest loads the plugin from its installed entry point."""
    plugins = importlib.metadata.entry_points(group="pytest11")
    return any(ep.value == "iampg.emulator.pytest_plugin" for ep in plugins)


def run(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=cwd,
    )


def test_importing_the_emulator_names_the_extra() -> None:
    """``from iampg.emulator import Emulator`` raises an ImportError that says what to install."""
    result = run(
        """
        try:
            from iampg.emulator import Emulator
        except ImportError as exc:
            print(type(exc).__name__, exc.name, exc, sep="|")
        import iampg, iampg.emulator.pytest_plugin  # the rest still imports
        """
    )
    assert result.returncode == 0, result.stderr
    kind, name, message = result.stdout.strip().split("|")
    assert (kind, name) == ("ImportError", "cryptography")
    assert message.endswith(INSTALL)


def test_iampg_emulate_names_the_extra() -> None:
    """``iampg emulate`` exits 2 with one line naming the extra."""
    result = run("from iampg.cli import main\nsys.exit(main(['emulate']))")
    assert result.returncode == 2
    assert result.stderr.startswith("iampg emulate: ")
    assert result.stderr.rstrip().endswith(INSTALL)
    assert result.stderr.count("\n") == 1


def test_a_plugin_fixture_names_the_extra(tmp_path: Path) -> None:
    """A test asking for iampg_emulator errors with an ImportError naming the extra."""
    (tmp_path / "test_it.py").write_text("def test_it(iampg_emulator):\n    pass\n")
    plugin = [] if installed() else ["-p", "iampg.emulator.pytest_plugin"]
    result = run(
        f"""
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *{plugin!r}]))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "ImportError: iampg.emulator.Emulator needs the emulator extra" in result.stdout
    assert INSTALL in result.stdout
