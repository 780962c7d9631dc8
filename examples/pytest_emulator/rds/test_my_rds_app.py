"""Database code tested on the emulator as RDS, provisioned Aurora or RDS Proxy."""

import pytest

import iampg
from iampg.emulator import Emulator


@pytest.mark.usefixtures("iampg_aws_env")  # the emulator's fake keys, nothing else
def test_connects_with_a_token(iampg_endpoint: iampg.Endpoint, iampg_emulator: Emulator) -> None:
    """A connection authenticates with an IAM token over verified TLS."""
    with iampg.connect(iampg_endpoint) as conn:
        row = conn.execute("select current_user").fetchone()
    assert row == (iampg_endpoint.user,)
    assert iampg_emulator.events[-1].outcome == "accepted"
