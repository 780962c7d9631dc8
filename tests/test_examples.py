"""The README's first command: the quick start runs the seed scenario on the emulator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs_the_seed_scenario_across_a_token_expiry() -> None:
    """CRUD through a pool, the first token refused after expiry, new connections still work.

    As on a fresh machine: no AWS or PG variables, and a throwaway PostgreSQL cluster.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PG", "IAMPG_EMULATOR_BACKEND"))
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    verbs = [
        line.split()[0] for line in lines if line.split()[0] in {"POST", "GET", "PUT", "DELETE"}
    ]
    assert verbs == ["POST", "GET", "PUT", "DELETE"]
    assert '"name": "ClassMethod Jiro"' in next(line for line in lines if line.startswith("PUT"))
    assert any('PAM authentication failed for user "postgres"' in line for line in lines)
    assert any("new connection ok" in line and "token renewed" in line for line in lines)
    assert "X-Amz-Signature" not in result.stdout + result.stderr
