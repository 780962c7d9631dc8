"""The botocore signer: token shapes, one client per provider, errors that name the cause."""

from __future__ import annotations

import subprocess
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.session
import pytest

from iampg import Endpoint, TokenError, TokenProvider

RDS = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app", port=5433)
DSQL = Endpoint("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")


class CountingSession:
    """A real botocore session that counts the clients made from it."""

    def __init__(self) -> None:
        self.session = botocore.session.get_session()
        self.clients = 0

    def get_credentials(self) -> Any:
        return self.session.get_credentials()

    def create_client(self, *args: Any, **kwargs: Any) -> Any:
        self.clients += 1
        return self.session.create_client(*args, **kwargs)


def _query(token: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit("https://" + token).query)


def test_rds_token_shape() -> None:
    """An RDS token signs host:port, Action=connect, the user and the rds-db scope."""
    token = TokenProvider(RDS).token()
    assert token.startswith("mydb.cluster-abc.us-east-1.rds.amazonaws.com:5433/?Action=connect&")
    q = _query(token)
    assert q["DBUser"] == ["app"]
    assert q["X-Amz-Expires"] == ["900"]
    assert q["X-Amz-Credential"][0].startswith("AKIAIOSFODNN7EXAMPLE/")
    assert q["X-Amz-Credential"][0].endswith("/us-east-1/rds-db/aws4_request")


@pytest.mark.parametrize(("user", "action"), [("admin", "DbConnectAdmin"), ("app", "DbConnect")])
def test_dsql_token_action_follows_the_user(user: str, action: str) -> None:
    """DSQL tokens use DbConnectAdmin for admin and DbConnect for any other role."""
    token = TokenProvider(DSQL.replace(user=user)).token()
    assert token.startswith(f"abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws/?Action={action}&")
    assert _query(token)["X-Amz-Credential"][0].endswith("/us-east-1/dsql/aws4_request")


def test_one_client_per_provider_not_per_token() -> None:
    """Many signings through one provider make a single botocore client."""
    session = CountingSession()
    provider = TokenProvider(RDS, session=session)
    for _ in range(5):
        provider.invalidate()
        provider.token()
    assert session.clients == 1


def test_missing_credentials_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without credentials, TokenError says which settings provide them."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(TokenError, match="no AWS credentials found") as info:
        TokenProvider(RDS).token()
    assert info.value.__cause__ is not None


def test_unknown_profile_is_reported() -> None:
    """A profile that does not exist is named in the error."""
    with pytest.raises(TokenError, match="profile"):
        TokenProvider(RDS, profile="does-not-exist").token()


def test_import_iampg_does_not_import_botocore() -> None:
    """``import iampg`` stays cheap: botocore is imported by the first token only."""
    code = "import sys, iampg; print('botocore' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
