"""Database code tested on the emulator as Aurora DSQL (its admin role is created for you)."""

import pytest

import iampg


@pytest.mark.usefixtures("iampg_aws_env")  # the emulator's fake keys, nothing else
def test_admin_connects(iampg_endpoint: iampg.Endpoint) -> None:
    """The endpoint is a DSQL one, for the admin role, and a connection logs in as admin."""
    assert (iampg_endpoint.kind, iampg_endpoint.user) == ("dsql", "admin")
    with iampg.connect(iampg_endpoint) as conn:
        assert conn.execute("select current_user").fetchone() == ("admin",)
