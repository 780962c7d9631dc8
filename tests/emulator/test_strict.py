"""The emulator refuses what AWS refuses: certificate names, rds_iam, IAM policies, token forms."""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING, Any

import botocore.session
import psycopg
import pytest

import iampg
from iampg.emulator import (
    FAKE_CREDENTIALS,
    Backend,
    Credentials,
    CredentialsServer,
    CredentialStore,
    Emulator,
    Policy,
    PolicyStore,
    Statement,
)
from iampg.emulator._policy import arn_matches
from iampg.emulator._sigv4 import presign
from iampg.errors import AuthenticationError, ConfigurationError
from support import EmulatorFactory, endpoint_for, node_with

if TYPE_CHECKING:
    from collections.abc import Iterator

PAM = 'PAM authentication failed for user "{user}"'
NO_IAM_USER = "iampg_strict_no_iam"
IAM_USER = "iampg_strict_iam"
ROLE = "arn:aws:iam::123456789012:role/iampg-strict-app"

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


def mint(
    emu: Emulator,
    user: str = "postgres",
    *,
    host: str | None = None,
    port: int | None = None,
    creds: Credentials = FAKE_CREDENTIALS,
) -> str:
    """Return a token botocore signs for the emulator."""
    session = botocore.session.get_session()
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    client = session.create_client("rds", region_name=emu.region)
    token: str = client.generate_db_auth_token(host or emu.host, port or emu.port, user, emu.region)
    return token


def mint_dsql(emu: Emulator, user: str) -> str:
    session = botocore.session.get_session()
    creds = FAKE_CREDENTIALS
    session.set_credentials(creds.access_key_id, creds.secret_access_key)
    client = session.create_client("dsql", region_name=emu.region)
    if user == "admin":
        token: str = client.generate_db_connect_admin_auth_token(emu.host, emu.region)
    else:
        token = client.generate_db_connect_auth_token(emu.host, emu.region)
    return token


def map_dsql_role(emu: Emulator, role: str) -> None:
    """Map ``role`` to the fake keys' principal, as DSQL's admin does (``AWS IAM GRANT``)."""
    conninfo = emu.conninfo("admin", password=mint_dsql(emu, "admin"))
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"AWS IAM GRANT {role} TO '{FAKE_CREDENTIALS.principal}'".encode())


def refusal(emu: Emulator, user: str, token: str, **params: Any) -> str:
    """Return the error text of a refused connection (failing if it connects)."""
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(emu.conninfo(user, password=token), connect_timeout=5, **params).close()
    return str(info.value)


def connects(emu: Emulator, user: str, token: str) -> bool:
    with psycopg.connect(emu.conninfo(user, password=token), connect_timeout=5) as conn:
        return conn.execute("SELECT current_user").fetchone() == (user,)


@pytest.fixture(scope="module")
def roles(backend: Backend) -> Backend:
    """Create one user without rds_iam and one with it (idempotent on a shared server)."""
    backend.ensure_role(NO_IAM_USER)
    backend.ensure_role(IAM_USER, iam=True)
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute(f"REVOKE rds_iam FROM {NO_IAM_USER}")
    return backend


# --- 1. certificate names -----------------------------------------------------------------


def test_certificate_names_the_endpoint_only(emulator: Emulator) -> None:
    """host=127.0.0.1 with verify-full fails as through a tunnel; host name + hostaddr works."""
    token = mint(emulator)
    loopback = (
        f"host=127.0.0.1 port={emulator.port} user=postgres dbname=postgres "
        f"sslmode=verify-full sslrootcert={emulator.ca_file} password={token}"
    )
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(psycopg.OperationalError, match="does not match host name"):
            psycopg.connect(loopback.replace("host=127.0.0.1", f"host={host}"), connect_timeout=5)
    assert connects(emulator, "postgres", token)


def test_loopback_names_are_added_when_asked_for(start_emulator: EmulatorFactory) -> None:
    """loopback_names=True: the certificate also names localhost, 127.0.0.1 and ::1."""
    emu = start_emulator(loopback_names=True)
    conninfo = (
        f"host=127.0.0.1 port={emu.port} user=postgres dbname=postgres "
        f"sslmode=verify-full sslrootcert={emu.ca_file} password={mint(emu)}"
    )
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- 2. rds_iam ---------------------------------------------------------------------------


def test_user_without_rds_iam_is_refused_with_rds_text(emulator: Emulator, roles: Backend) -> None:
    """A valid token for a user not granted rds_iam: PAM failure; the event says why."""
    text = refusal(emulator, NO_IAM_USER, mint(emulator, NO_IAM_USER))
    assert PAM.format(user=NO_IAM_USER) in text
    event = emulator.events[-1]
    assert (event.outcome, event.reason, event.sqlstate) == (
        "rejected",
        "not granted rds_iam",
        "28000",
    )
    assert event.detail == f'GRANT rds_iam TO "{NO_IAM_USER}"'
    assert connects(emulator, IAM_USER, mint(emulator, IAM_USER))


def test_a_user_that_does_not_exist_is_told_to_be_created(emulator: Emulator) -> None:
    """The same PAM failure as RDS; the hint creates the user before granting it rds_iam."""
    user = "iampg_strict_nobody"
    text = refusal(emulator, user, mint(emulator, user))
    assert PAM.format(user=user) in text
    event = emulator.events[-1]
    assert event.reason == "not granted rds_iam"
    assert event.detail == (
        f'no such database user: CREATE ROLE "{user}" LOGIN; GRANT rds_iam TO "{user}"'
    )


def test_rds_iam_is_judged_at_every_login(emulator: Emulator, backend: Backend) -> None:
    """Granting and revoking rds_iam takes effect at the next login, as on RDS."""
    user = "iampg_strict_toggle"
    backend.ensure_role(user, iam=True)
    assert connects(emulator, user, mint(emulator, user))
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute(f"REVOKE rds_iam FROM {user}")
    assert PAM.format(user=user) in refusal(emulator, user, mint(emulator, user))
    backend.ensure_role(user, iam=True)
    assert connects(emulator, user, mint(emulator, user))


def test_rds_iam_through_a_group_counts_and_a_superuser_needs_it(
    emulator: Emulator, backend: Backend
) -> None:
    """Membership through another role counts; being a superuser does not replace it."""
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        for statement in (
            "DROP ROLE IF EXISTS iampg_strict_member",
            "DROP ROLE IF EXISTS iampg_strict_super",
            "DROP ROLE IF EXISTS iampg_strict_group",
            "CREATE ROLE iampg_strict_group NOLOGIN",
            "GRANT rds_iam TO iampg_strict_group",
            "CREATE ROLE iampg_strict_member LOGIN IN ROLE iampg_strict_group",
            "CREATE ROLE iampg_strict_super LOGIN SUPERUSER",
        ):
            conn.execute(statement)
    assert connects(emulator, "iampg_strict_member", mint(emulator, "iampg_strict_member"))
    text = refusal(emulator, "iampg_strict_super", mint(emulator, "iampg_strict_super"))
    assert PAM.format(user="iampg_strict_super") in text
    assert emulator.events[-1].reason == "not granted rds_iam"


def test_missing_user_is_refused_like_one_without_rds_iam(emulator: Emulator) -> None:
    """A user the database lacks gets the same PAM text, never "role does not exist"."""
    text = refusal(emulator, "iampg_strict_nobody", mint(emulator, "iampg_strict_nobody"))
    assert PAM.format(user="iampg_strict_nobody") in text
    assert "does not exist" not in text


def test_rds_iam_rule_can_be_switched_off(start_emulator: EmulatorFactory, roles: Backend) -> None:
    """require_rds_iam=False accepts a user without the grant (today's laxer behaviour)."""
    emu = start_emulator(require_rds_iam=False)
    assert connects(emu, NO_IAM_USER, mint(emu, NO_IAM_USER))


def test_ensure_role_iam_grants_an_existing_role(backend: Backend) -> None:
    """ensure_role(iam=True) grants rds_iam to a role that already exists."""
    user = "iampg_strict_late"
    backend.ensure_role(user)
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute(f"REVOKE rds_iam FROM {user}")
        backend.ensure_role(user, iam=True)
        row = conn.execute(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = 'rds_iam' AND u.rolname = %s",
            (user,),
        ).fetchone()
    assert row == (1,)


# --- 3. IAM policies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "arn", "matches"),
    [
        ("*", "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app", True),
        (
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app",
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app",
            True,
        ),
        (
            "arn:aws:rds-db:*:*:dbuser:*/app",
            "arn:aws:rds-db:eu-west-1:123456789012:dbuser:db-ABC/app",
            True,
        ),
        (
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/*",
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/other",
            True,
        ),
        (
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/ap?",
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app",
            True,
        ),
        (
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app",
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/APP",
            False,
        ),
        (
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app",
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app2",
            False,
        ),
        # a wildcard stays inside its colon-separated part
        ("arn:aws:rds-db:*", "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app", False),
        (
            "arn:aws:dsql:us-east-1:123456789012:cluster/*",
            "arn:aws:dsql:us-east-1:123456789012:cluster/abc",
            True,
        ),
    ],
)
def test_resource_patterns_match_as_iam_does(pattern: str, arn: str, *, matches: bool) -> None:
    """``*`` and ``?`` within parts, case-sensitive, never across the ARN's colons."""
    assert arn_matches(pattern, arn) is matches


def test_actions_match_case_insensitively_with_wildcards() -> None:
    """Actions match as IAM's: case-insensitive, ``rds-db:*`` and ``*`` included."""
    store = PolicyStore()
    arn = "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABC/app"
    for action in ("RDS-DB:Connect", "rds-db:*", "*"):
        store.clear()
        store.attach("arn:aws:iam::123456789012:user/u", Policy(Statement.allow(action, arn)))
        assert store.evaluate("arn:aws:iam::123456789012:user/u", "rds-db:connect", arn).allowed
    store.clear()
    store.attach("arn:aws:iam::123456789012:user/u", Policy(Statement.allow("rds:*", arn)))
    assert not store.evaluate("arn:aws:iam::123456789012:user/u", "rds-db:connect", arn).allowed


@pytest.fixture
def policies(emulator: Emulator) -> Iterator[PolicyStore]:
    """The emulator's policy store, emptied after the test."""
    yield emulator.policies
    emulator.policies.clear()


def test_without_a_policy_everything_is_allowed(emulator: Emulator) -> None:
    """No policy attached: any key may connect anywhere (the emulator's default)."""
    assert emulator.policies.policies(FAKE_CREDENTIALS.principal or "") == []
    assert connects(emulator, "postgres", mint(emulator))


def test_policy_allowing_the_user_arn_lets_it_in(emulator: Emulator, policies: PolicyStore) -> None:
    """rds-db:connect on the dbuser ARN (exact, or with wildcards) allows the connection."""
    principal = FAKE_CREDENTIALS.principal
    assert principal == "arn:aws:iam::123456789012:user/iampg-emulator"
    arn = emulator.resource_arn("postgres")
    assert arn == (
        f"arn:aws:rds-db:{emulator.region}:123456789012:dbuser:{emulator.resource_id}/postgres"
    )
    assert emulator.resource_id.startswith("db-")
    policies.attach(principal, Policy(Statement.allow("rds-db:connect", arn)))
    assert connects(emulator, "postgres", mint(emulator))
    policies.clear()
    wildcard = f"arn:aws:rds-db:*:{emulator.account_id}:dbuser:db-*/post*"
    policies.attach(principal, Policy(Statement.allow("rds-db:connect", wildcard)))
    assert connects(emulator, "postgres", mint(emulator))


def test_policy_for_another_user_refuses_with_the_missing_statement(
    emulator: Emulator, policies: PolicyStore
) -> None:
    """A policy that allows only another user: PAM failure; the event names action and ARN."""
    principal = FAKE_CREDENTIALS.principal or ""
    policies.attach(
        principal, Policy(Statement.allow("rds-db:connect", emulator.resource_arn("someone")))
    )
    text = refusal(emulator, "postgres", mint(emulator))
    assert PAM.format(user="postgres") in text
    event = emulator.events[-1]
    assert (event.outcome, event.reason, event.sqlstate) == ("rejected", "not authorized", "28000")
    assert event.detail == (
        f"no policy of {principal} allows rds-db:connect on {emulator.resource_arn('postgres')}"
    )


def test_explicit_deny_wins_over_allow(emulator: Emulator, policies: PolicyStore) -> None:
    """A Deny statement refuses even where another statement allows; its Sid is named."""
    principal = FAKE_CREDENTIALS.principal or ""
    policies.attach(principal, Policy(Statement.allow("rds-db:*", "*")))
    policies.attach(
        principal,
        Policy.from_json(
            {
                "Version": "2012-10-17",
                "Statement": {
                    "Sid": "NoPostgres",
                    "Effect": "Deny",
                    "Action": "rds-db:connect",
                    "Resource": ["arn:aws:rds-db:*:*:dbuser:*/postgres"],
                },
            }
        ),
    )
    assert PAM.format(user="postgres") in refusal(emulator, "postgres", mint(emulator))
    event = emulator.events[-1]
    assert event.reason == "explicitly denied"
    assert "'NoPostgres'" in event.detail
    assert emulator.resource_arn("postgres") in event.detail


def test_policy_documents_are_parsed_and_unsupported_parts_refused() -> None:
    """Policy.from_json reads IAM's JSON; Condition and NotResource are refused, not ignored."""
    policy = Policy.from_json(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
        '"Action": ["rds-db:connect"], "Resource": "arn:aws:rds-db:*:*:dbuser:*/app"}]}'
    )
    assert policy.statements == (
        Statement("Allow", ("rds-db:connect",), ("arn:aws:rds-db:*:*:dbuser:*/app",)),
    )
    for extra in ('"Condition": {}', '"NotResource": "*"'):
        document = (
            '{"Statement": [{"Effect": "Allow", "Action": "rds-db:connect", '
            f'"Resource": "*", {extra}}}]}}'
        )
        with pytest.raises(ValueError, match="does not evaluate"):
            Policy.from_json(document)
    with pytest.raises(ValueError, match="Effect"):
        Statement("Maybe", ("a:b",), ("*",))  # type: ignore[arg-type]


def test_authentication_error_names_the_arn_the_policy_must_allow(
    emulator: Emulator, policies: PolicyStore
) -> None:
    """iampg's AuthenticationError lists the dbuser ARN; the emulator's refused ARN fits it."""
    principal = FAKE_CREDENTIALS.principal or ""
    policies.attach(principal, Policy(Statement.deny("rds-db:connect", "*")))
    with pytest.raises(AuthenticationError) as info:
        iampg.connect(endpoint_for(emulator)).close()
    text = str(info.value)
    pattern = f"arn:aws:rds-db:{emulator.region}:<account>:dbuser:<resource id>/postgres"
    assert pattern in text
    filled = pattern.replace("<account>", emulator.account_id).replace(
        "<resource id>", emulator.resource_id
    )
    assert filled == emulator.resource_arn("postgres")
    assert filled in emulator.events[-1].detail


def test_doctor_names_the_arn_the_policy_must_allow(
    emulator: Emulator, policies: PolicyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """iampg doctor fails the authentication step and names the dbuser ARN to allow."""
    from iampg.cli import main

    policies.attach(FAKE_CREDENTIALS.principal or "", Policy(Statement.deny("*", "*")))
    code = main(
        [
            "doctor",
            emulator.host,
            "--user",
            "postgres",
            "--port",
            str(emulator.port),
            "--hostaddr",
            emulator.listen_host,
            "--sslmode",
            "verify-full",
            "--sslrootcert",
            str(emulator.ca_file),
            "--timeout",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert f"arn:aws:rds-db:{emulator.region}:<account>:dbuser:<resource id>/postgres" in out
    assert emulator.events[-1].reason == "explicitly denied"


def test_role_credentials_carry_the_roles_principal(
    start_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Container keys are a session of the server's role; that role's policies judge them."""
    emu = start_emulator(credentials=CredentialStore())
    with CredentialsServer.for_emulator(emu, role_arn=ROLE) as server:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        session = botocore.session.Session()
        client = session.create_client("rds", region_name=emu.region)
        token = client.generate_db_auth_token(emu.host, emu.port, "postgres", emu.region)
        (issued,) = server.issued
        assert issued.principal == (
            "arn:aws:sts::123456789012:assumed-role/iampg-strict-app/iampg-emulator-task"
        )
        emu.policies.attach(ROLE, Policy(Statement.allow("rds-db:connect", "*/nobody")))
        assert PAM.format(user="postgres") in refusal(emu, "postgres", token)
        assert emu.events[-1].detail.startswith(f"no policy of {issued.principal} allows")
        emu.policies.attach(ROLE, Policy(Statement.allow("rds-db:connect", "*")))
        assert connects(emu, "postgres", token)


def test_assume_role_credentials_carry_the_assumed_role(start_emulator: EmulatorFactory) -> None:
    """AssumeRole keys belong to arn:aws:sts::<account>:assumed-role/<role>/<session>."""
    store = CredentialStore()
    emu = start_emulator(credentials=store)
    with CredentialsServer(store, clock=emu.clock) as server:
        session = botocore.session.Session()
        creds = FAKE_CREDENTIALS
        session.set_credentials(creds.access_key_id, creds.secret_access_key)
        sts = session.create_client("sts", region_name="us-east-1", endpoint_url=server.url)
        answer = sts.assume_role(RoleArn=ROLE, RoleSessionName="strict")
        key = store.lookup(answer["Credentials"]["AccessKeyId"])
        assert key is not None
        assert key.principal == answer["AssumedRoleUser"]["Arn"]
        emu.policies.attach(ROLE, Policy(Statement.deny("rds-db:connect", "*")))
        token = mint(emu, creds=key)
        assert PAM.format(user="postgres") in refusal(emu, "postgres", token)
        assert emu.events[-1].reason == "explicitly denied"
        assert connects(emu, "postgres", mint(emu))  # the example user has no policy


@pytest.mark.parametrize(
    ("action", "admin_allowed", "role_allowed"),
    [("dsql:DbConnectAdmin", True, False), ("dsql:DbConnect", False, True), ("dsql:*", True, True)],
)
def test_dsql_policies_judge_each_action_on_the_cluster_arn(
    start_emulator: EmulatorFactory,
    backend: Backend,
    action: str,
    *,
    admin_allowed: bool,
    role_allowed: bool,
) -> None:
    """DbConnectAdmin for admin, DbConnect for other roles, each on the cluster ARN."""
    backend.ensure_role("admin", superuser=True)
    backend.ensure_role("iampg_strict_dsql")
    emu = start_emulator(service="dsql")
    map_dsql_role(emu, "iampg_strict_dsql")
    cluster = emu.resource_arn("admin")
    assert cluster == f"arn:aws:dsql:{emu.region}:123456789012:cluster/{emu.host.split('.')[0]}"
    assert emu.resource_arn("iampg_strict_dsql") == cluster
    emu.policies.attach(FAKE_CREDENTIALS.principal or "", Policy(Statement.allow(action, cluster)))
    for user, allowed in (("admin", admin_allowed), ("iampg_strict_dsql", role_allowed)):
        token = mint_dsql(emu, user)
        if allowed:
            assert connects(emu, user, token)
            continue
        text = refusal(emu, user, token)
        assert "unable to accept connection, access denied" in text
        needed = emu.iam_action(user)
        assert f"is not authorized to perform: {needed} on resource: {cluster}" in text
        assert emu.events[-1].reason == "not authorized"


def test_dsql_needs_no_rds_iam(start_emulator: EmulatorFactory, backend: Backend) -> None:
    """rds_iam is RDS's rule: a DSQL role without it logs in."""
    backend.ensure_role("iampg_strict_dsql")
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute("REVOKE rds_iam FROM iampg_strict_dsql")
    backend.ensure_role("admin", superuser=True)
    emu = start_emulator(service="dsql")
    map_dsql_role(emu, "iampg_strict_dsql")
    assert connects(emu, "iampg_strict_dsql", mint_dsql(emu, "iampg_strict_dsql"))


# --- 7. tokens as other signers make them -------------------------------------------------


def test_upper_case_host_tokens_are_accepted_in_both_signing_forms(emulator: Emulator) -> None:
    """A host in upper case: signed lower-cased (botocore) or as given (the JavaScript SDK)."""
    upper = emulator.host.upper()
    botocore_form = mint(emulator, host=upper)
    assert botocore_form.startswith(upper)
    assert connects(emulator, "postgres", botocore_form)
    for host_as_given in (True, False):
        token = presign(
            host=upper,
            port=emulator.port,
            credentials=FAKE_CREDENTIALS,
            region=emulator.region,
            signed_at=time.time(),
            user="postgres",
            host_as_given=host_as_given,
        )
        assert connects(emulator, "postgres", token)
    tampered = presign(
        host=upper,
        port=emulator.port,
        credentials=Credentials(FAKE_CREDENTIALS.access_key_id, "wrong-secret"),
        region=emulator.region,
        signed_at=time.time(),
        user="postgres",
        host_as_given=True,
    )
    assert PAM.format(user="postgres") in refusal(emulator, "postgres", tampered)
    assert emulator.events[-1].reason == "signature mismatch"


_JS_SIGNER = """
const { Signer } = require('@aws-sdk/rds-signer');
const [host, port, user] = process.argv.slice(1);
new Signer({ hostname: host, port: Number(port), username: user, region: 'us-east-1',
             credentials: { accessKeyId: 'AKIAIOSFODNN7EXAMPLE',
                            secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' } })
  .getAuthToken().then((token) => process.stdout.write(token))
  .catch((err) => { console.error(err.message); process.exit(1); });
"""


def test_javascript_sdk_tokens_for_upper_case_hosts(emulator: Emulator) -> None:
    """@aws-sdk/rds-signer signs the host as given; its tokens log in in any case."""
    found = node_with("@aws-sdk/rds-signer")
    if found is None:
        pytest.skip("node or @aws-sdk/rds-signer is not installed (npm ci --prefix tests/node)")
    node, env = found
    mixed = "IAMPG-Emulator" + emulator.host[len("iampg-emulator") :]
    for host in (emulator.host, emulator.host.upper(), mixed):
        result = subprocess.run(
            [node, "-e", _JS_SIGNER, host, str(emulator.port), "postgres"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(host + ":")
        assert connects(emulator, "postgres", result.stdout)


def test_advertise_port_is_the_port_tokens_carry(start_emulator: EmulatorFactory) -> None:
    """advertise_port: tokens must carry the tunnel's port, not the one listened on."""
    emu = start_emulator(advertise_port=6543)
    assert emu.advertise_port == 6543
    assert connects(emu, "postgres", mint(emu, port=6543))
    assert PAM.format(user="postgres") in refusal(emu, "postgres", mint(emu))
    assert emu.events[-1].reason == "wrong port"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"advertise_port": 0}, "advertise_port must be from 1 to 65535"),
        ({"advertise_port": 6543, "service": "dsql"}, "DSQL tokens carry no port"),
        ({"account_id": "12345"}, "account_id must be 12 digits"),
        ({"resource_id": "db/x"}, "resource_id must be"),
    ],
)
def test_bad_strictness_settings_are_configuration_errors(
    backend: Backend, options: dict[str, Any], message: str
) -> None:
    """Settings that cannot work are refused when the emulator is made."""
    with pytest.raises(ConfigurationError, match=message):
        Emulator(backend.dsn, **options)


def test_dsql_authentication_error_names_the_cluster_arn(
    start_emulator: EmulatorFactory, backend: Backend
) -> None:
    """DSQL: AuthenticationError names the cluster ARN; the emulator refused exactly that."""
    backend.ensure_role("admin", superuser=True)
    emu = start_emulator(service="dsql")
    emu.policies.attach(FAKE_CREDENTIALS.principal or "", Policy(Statement.deny("dsql:*", "*")))
    with pytest.raises(AuthenticationError) as info:
        iampg.connect(endpoint_for(emu, "admin", kind="dsql")).close()
    cluster = emu.host.split(".")[0]
    pattern = f"arn:aws:dsql:{emu.region}:<account>:cluster/{cluster}"
    assert f"does not allow dsql:DbConnectAdmin on the cluster, {pattern}" in str(info.value)
    assert pattern.replace("<account>", emu.account_id) == emu.resource_arn("admin")
    assert emu.resource_arn("admin") in emu.events[-1].detail
