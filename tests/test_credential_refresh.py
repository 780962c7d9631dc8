"""Revoked or rotated credentials: a refused token makes the signer fetch them again, once."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

import iampg
from fakes import CountingSigner, FakeClock
from iampg import AwsSigner, Endpoint, SignedToken, TokenProvider
from iampg._sigv4 import EnvSigner
from iampg.emulator import (
    FAKE_CREDENTIALS,
    Credentials,
    CredentialsServer,
    CredentialStore,
    Emulator,
)
from support import EmulatorFactory, endpoint_for, use_credentials_server

ROLE = "arn:aws:iam::123456789012:role/app"
# The second documented example key pair (AWS's documentation uses both).
OTHER_KEYS = Credentials("AKIAI44QH8DHBEXAMPLE", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY")
EP = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture
def emu(start_emulator: EmulatorFactory) -> Emulator:
    """Return an emulator whose known keys live in a store the test can revoke keys from."""
    return start_emulator(credentials=CredentialStore([FAKE_CREDENTIALS, OTHER_KEYS]))


def key_of(token: str) -> str:
    """Return the access key id a token was signed with (never the token itself)."""
    return parse_qs(urlsplit("//" + token).query)["X-Amz-Credential"][0].split("/")[0]


def revoke(emu: Emulator, access_key_id: str) -> None:
    """Make the emulator refuse every token signed with this key, as IAM does once revoked."""
    store = emu.credential_store
    assert isinstance(store, CredentialStore)
    store.remove(access_key_id)


def connects(provider: TokenProvider) -> bool:
    """Connect through iampg (one retry after a refused token) and run a query."""
    with iampg.connect(provider=provider) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


class RefreshingSigner(CountingSigner):
    """A counting signer that also counts the calls to refresh its credentials."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshes = 0

    def refresh_credentials(self) -> None:
        self.refreshes += 1


def test_refused_token_refreshes_credentials_at_most_every_30_seconds() -> None:
    """Forgetting a refused current token refreshes credentials; not again within 30 s."""
    signer = RefreshingSigner()
    clock = FakeClock()
    provider = TokenProvider(EP, signer=signer, clock=clock)
    provider.invalidate(provider.token())
    assert signer.refreshes == 1
    provider.invalidate(provider.token())  # refused again at once: no second fetch
    assert signer.refreshes == 1
    provider.invalidate()  # forgetting without a refused token fetches nothing
    provider.invalidate("token-that-is-not-cached")
    assert signer.refreshes == 1
    clock.advance(30)
    provider.invalidate(provider.token())
    assert signer.refreshes == 2
    assert signer.calls == 3


def test_signer_without_refresh_is_fine() -> None:
    """A signer without refresh_credentials() is only asked for a new token."""
    signer = CountingSigner()
    provider = TokenProvider(EP, signer=signer, clock=FakeClock())
    provider.invalidate(provider.token())
    assert provider.token() == "token-2-app"


def test_revoked_container_key_is_fetched_again_within_one_connect(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Container keys revoked while botocore still holds them: the next connect fetches anew."""
    with CredentialsServer.for_emulator(emu) as server:
        use_credentials_server(monkeypatch, server)
        provider = TokenProvider(endpoint_for(emu))
        assert connects(provider)
        first = key_of(provider.token())
        revoke(emu, first)
        assert connects(provider)  # refused once, credentials fetched again, accepted
        assert key_of(provider.token()) != first
        assert server.stats().issued == 2
        assert [e.outcome for e in emu.events[-2:]] == ["rejected", "accepted"]


def test_revoked_role_session_is_assumed_again_within_one_connect(emu: Emulator) -> None:
    """A role session revoked before it expires: the next connect assumes the role again."""
    with CredentialsServer.for_emulator(emu) as sts:
        provider = TokenProvider(endpoint_for(emu), role_arn=ROLE, sts_endpoint_url=sts.url)
        assert connects(provider)
        first = key_of(provider.token())
        revoke(emu, first)
        assert connects(provider)
        calls = sts.assume_role_calls
        assert len(calls) == 2
        assert key_of(provider.token()) == calls[-1].access_key_id != first


def test_keys_rotated_in_the_environment_are_read_again(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Environment keys replaced and the old ones revoked: the next connect uses the new ones."""
    provider = TokenProvider(endpoint_for(emu))
    assert isinstance(provider._signer, EnvSigner)
    assert connects(provider)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OTHER_KEYS.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OTHER_KEYS.secret_access_key)
    revoke(emu, FAKE_CREDENTIALS.access_key_id)
    assert connects(provider)
    assert key_of(provider.token()) == OTHER_KEYS.access_key_id


def signed_key(signer: AwsSigner) -> str:
    token: SignedToken = signer.sign(EP, 900)
    return key_of(token.token)


def test_shared_signer_follows_new_environment_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared default-chain signer signs with new AWS_ACCESS_KEY_ID keys once they are set."""
    signer = AwsSigner.shared()
    assert signed_key(signer) == FAKE_CREDENTIALS.access_key_id
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OTHER_KEYS.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OTHER_KEYS.secret_access_key)
    assert AwsSigner.shared() is signer
    assert signed_key(signer) == OTHER_KEYS.access_key_id


def test_shared_signer_follows_a_new_container_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pointed at another container credentials endpoint, the shared signer fetches from it."""
    with CredentialsServer() as first, CredentialsServer() as second:
        use_credentials_server(monkeypatch, first)
        signer = AwsSigner.shared()
        assert signed_key(signer) == first.issued[-1].access_key_id
        for name, value in second.env().items():
            monkeypatch.setenv(name, value)
        assert signed_key(signer) == second.issued[-1].access_key_id
        assert first.stats().issued == 1
