"""The botocore signer: token shapes, botocore's tokens byte for byte, errors naming the cause."""

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


def test_signing_makes_no_botocore_client() -> None:
    """Signings take the session's credentials and make no client (a client loads a model)."""
    session = CountingSession()
    provider = TokenProvider(RDS, session=session)
    tokens = set()
    for _ in range(3):
        provider.invalidate()
        tokens.add(provider.token())
    assert session.clients == 0
    assert all(t.startswith("mydb.cluster-abc.us-east-1.rds.amazonaws.com:5433/?") for t in tokens)


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


def test_providers_with_the_same_source_share_one_signer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Providers given the same credential source share one signer and its credentials."""
    session = CountingSession()
    a = TokenProvider(RDS, session=session)
    b = TokenProvider(RDS.replace(user="other"), session=session)
    a.token()
    b.token()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # the default chain, not the environment signer
    c = TokenProvider(RDS)
    d = TokenProvider(RDS.replace(port=5432))
    assert a._signer is b._signer
    assert c._signer is d._signer
    assert c._signer is not a._signer


def test_static_keys_sign_and_are_not_shown() -> None:
    """Static keys sign tokens; the signer's repr shows neither the key id nor the secret."""
    provider = TokenProvider(
        RDS,
        aws_access_key_id="AKIAI44QH8DHBEXAMPLE",
        aws_secret_access_key="je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
    )
    token = provider.token()
    assert "X-Amz-Credential=AKIAI44QH8DHBEXAMPLE%2F" in token
    assert "je7MtGbClwBF" not in repr(provider)
    assert "AKIAI44QH8DHBEXAMPLE" not in repr(provider)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": "a", "aws_access_key_id": "x", "aws_secret_access_key": "y"}, "one cred"),
        ({"aws_access_key_id": "x"}, "both"),
        ({"external_id": "x"}, "need role_arn"),
        ({"sts_region": "eu-west-1"}, "sts_region and sts_endpoint_url need role_arn"),
        ({"role_arn": "myrole"}, "role ARN"),
        ({"role_arn": "arn:aws:iam::123456789012:role/a", "role_duration": 60}, "900"),
    ],
)
def test_bad_credential_arguments(kwargs: dict[str, Any], message: str) -> None:
    """Conflicting or incomplete credential arguments fail early and say why."""
    from iampg import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        TokenProvider(RDS, **kwargs)


def test_debug_logs_never_carry_the_token(caplog: pytest.LogCaptureFixture) -> None:
    """With DEBUG on everywhere, neither iampg nor botocore logs the token or its signature."""
    import logging

    with caplog.at_level(logging.DEBUG):
        # botocore signs (a session given), so its own DEBUG records are exercised too.
        provider = TokenProvider(RDS.replace(user="logcheck"), session=botocore.session.Session())
        token = provider.token()
        provider.invalidate()
        provider.token()
    signature = token.rsplit("X-Amz-Signature=", 1)[1]
    assert any(r.name.startswith("iampg") for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage()
        assert signature not in text, record.name
        assert token not in text, record.name


def test_environment_keys_sign_without_botocore() -> None:
    """With plain environment keys and no other source, tokens are signed without botocore."""
    code = (
        "import sys, iampg\n"
        "p = iampg.TokenProvider('postgresql://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com')\n"
        "t = p.token()\n"
        "print(type(p._signer).__name__, 'botocore' in sys.modules, 'DBUser=app' in t)"
    )
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.split() == ["EnvSigner", "False", "True"]


def test_describe_credentials_names_the_source_without_secrets() -> None:
    """describe_credentials says where the keys come from, shows 4 characters, no secret."""
    from iampg import AwsSigner

    info = AwsSigner().describe_credentials()
    assert (info.method, info.temporary, info.key_suffix, info.expires_in) == (
        "env",
        False,
        "MPLE",
        None,
    )
    assert info.source.startswith("environment variables")
    assert "wJalrXUtnFEMI" not in repr(info)


def test_describe_credentials_of_a_container_role(monkeypatch: pytest.MonkeyPatch) -> None:
    """Container credentials are described as temporary, expiring, from the container role."""
    from iampg import AwsSigner
    from iampg.emulator import CredentialsServer
    from support import use_credentials_server

    with CredentialsServer(lifetime=1800) as server:
        use_credentials_server(monkeypatch, server)
        info = AwsSigner().describe_credentials()
        issued = server.issued[-1].access_key_id
    assert info.method == "container-role"
    assert info.temporary
    assert info.key_suffix == issued[-4:]
    assert info.expires_in is not None
    assert 1700 < info.expires_in <= 1800


@pytest.mark.parametrize(
    "body",
    [
        # SSO GetRoleCredentials
        (
            b'{"roleCredentials":{"accessKeyId":"ASIAEXAMPLE","secretAccessKey":"s3cr3t-one",'
            b'"sessionToken":"s3cr3t-two","expiration":1764700000000}}'
        ),
        # SSO OIDC CreateToken
        b'{"accessToken":"s3cr3t-one","refreshToken":"s3cr3t-two","expiresIn":3600}',
        # container credentials
        b'{"AccessKeyId": "ASIAEXAMPLE", "SecretAccessKey": "s3cr3t-one", "Token": "s3cr3t-two"}',
        # STS AssumeRole
        (
            b"<Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>s3cr3t-one"
            b"</SecretAccessKey><SessionToken>s3cr3t-two</SessionToken></Credentials>"
        ),
        # a presigned URL
        b"GET https://h/?X-Amz-Security-Token=s3cr3t-one&X-Amz-Signature=s3cr3t-two HTTP/1.1",
    ],
    ids=["sso", "sso-oidc", "container", "sts", "query"],
)
def test_botocore_debug_records_are_masked(body: bytes) -> None:
    """Secret values in botocore's DEBUG records become ***; the record itself is kept."""
    import logging

    from iampg import AwsSigner

    AwsSigner()  # installs the filters
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("botocore.parsers")
    handler = Keep(logging.DEBUG)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("Response body:\n%r", body)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(seen) == 1
    assert "s3cr3t" not in seen[0]
    assert seen[0].count("***") == 2
    assert seen[0].startswith("Response body:")
