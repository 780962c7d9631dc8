"""Database code tested on the emulator as Aurora Serverless v2, which pauses and resumes."""

import pytest

import iampg
from iampg.emulator import Emulator


@pytest.mark.usefixtures("iampg_aws_env")  # the emulator's fake keys, nothing else
def test_connect_waits_for_a_paused_cluster(
    iampg_endpoint: iampg.Endpoint, iampg_emulator: Emulator
) -> None:
    """A connection to a paused cluster waits for it to resume (16 s, at 60x: a quarter s)."""
    iampg_emulator.pause()
    with iampg.connect(iampg_endpoint, preset="aurora-serverless") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    outcomes = [event.outcome for event in iampg_emulator.events]
    assert outcomes[-4:] == ["paused", "resuming", "resumed", "accepted"]
