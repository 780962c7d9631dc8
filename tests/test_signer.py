"""The signer contract is written once, the core has no import circle, botocore stays in _aws."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import iampg
from iampg import AwsSigner, TokenProvider, _signer
from iampg._sigv4 import EnvSigner

SRC = Path(iampg.__file__).parent

# The token core: the modules a token is made from, which must import each other one way only.
CORE = ("_signer", "_tokens", "_aws", "_sigv4", "_refresh", "_endpoint", "errors")


def imports_of(path: Path) -> set[str]:
    """Return every module ``path`` imports, lazily too, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "iampg":
                found.update(f"iampg.{alias.name}" for alias in node.names)
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(tree)
    return found


def core_graph() -> dict[str, set[str]]:
    """Map each core module to the core modules it imports."""
    return {
        name: {
            other
            for other in CORE
            if f"iampg.{other}" in imports_of(SRC / f"{name}.py") and other != name
        }
        for name in CORE
    }


def test_signer_module_is_a_leaf() -> None:
    """iampg._signer imports no other iampg module at run time."""
    assert not {m for m in imports_of(SRC / "_signer.py") if m.split(".")[0] == "iampg"}


def test_token_core_has_no_import_circle() -> None:
    """Following imports (lazy ones included) among the token core never comes back."""
    graph = core_graph()
    assert "_tokens" not in graph["_aws"]
    assert "_tokens" not in graph["_sigv4"]
    assert {"_signer"} <= graph["_aws"] & graph["_sigv4"] & graph["_tokens"]

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return seen

    circles = [name for name in CORE if name in reachable(name)]
    assert circles == []


def test_only_the_aws_module_imports_botocore() -> None:
    """No module of src/iampg but _aws.py imports botocore (or boto3)."""
    importers = sorted(
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if any(m.split(".")[0] in {"botocore", "boto3"} for m in imports_of(path))
    )
    assert importers == ["_aws.py"]


def credential_parameters(func: object) -> dict[str, inspect.Parameter]:
    """Return the credential options among ``func``'s parameters, by name."""
    parameters = inspect.signature(func).parameters  # type: ignore[arg-type]
    return {name: p for name, p in parameters.items() if name in _signer.CREDENTIAL_OPTIONS}


def test_provider_and_signer_take_the_same_credential_options() -> None:
    """TokenProvider and AwsSigner take every declared option, alike in kind, default and type."""
    provider = credential_parameters(TokenProvider.__init__)
    signer = credential_parameters(AwsSigner.__init__)
    assert list(signer) == list(_signer.CREDENTIAL_OPTIONS)
    assert list(provider) == list(_signer.CREDENTIAL_OPTIONS)
    for name in _signer.CREDENTIAL_OPTIONS:
        a, b = provider[name], signer[name]
        assert (a.kind, a.default, a.annotation) == (b.kind, b.default, b.annotation), name
        assert a.kind is inspect.Parameter.KEYWORD_ONLY
    extra = set(inspect.signature(AwsSigner.__init__).parameters) - {"self", *signer}
    assert extra == set()  # AwsSigner takes nothing but credential options


def test_provider_hands_every_credential_option_to_the_signer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each credential option given to TokenProvider reaches AwsSigner.shared under its name."""
    seen: list[dict[str, object]] = []

    def shared(**options: object) -> EnvSigner:
        seen.append(options)
        return EnvSigner("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

    monkeypatch.setattr(AwsSigner, "shared", staticmethod(shared))
    values = {name: f"value-of-{name}" for name in _signer.CREDENTIAL_OPTIONS}
    TokenProvider("postgresql://app@db.cluster-abc.us-east-1.rds.amazonaws.com", **values)  # type: ignore[arg-type]
    assert seen == [values]


@pytest.mark.parametrize(("user", "action"), [("admin", "DbConnectAdmin"), ("app", "DbConnect")])
def test_dsql_admin_rule(user: str, action: str) -> None:
    """The DSQL rule: role admin signs DbConnectAdmin, every other role DbConnect."""
    assert _signer.dsql_action(user) == action


def test_public_names_are_the_contract_objects() -> None:
    """iampg re-exports SignedToken, Signer and Clock from the contract module unchanged."""
    assert iampg.SignedToken is _signer.SignedToken
    assert iampg.Signer is _signer.Signer
    assert iampg.Clock is _signer.Clock
    assert _signer.RDS_TOKEN_LIFETIME == 900.0
    assert _signer.DSQL_MAX_LIFETIME == 604_800.0
