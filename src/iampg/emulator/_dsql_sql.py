"""DSQL's SQL surface without I/O: the texts, the rules, a statement splitter and classifier.

The relay (``_dsql_relay``) asks :func:`classify` about every statement a DSQL session sends
(simple ``Query`` and extended ``Parse`` messages) and refuses what DSQL refuses, with DSQL's
SQLSTATE and message. Texts not found in AWS's documentation are marked unconfirmed.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["DsqlRules", "Refusal", "Statement", "classify", "split_statements"]

# --- what clients see; "confirmed" means AWS's documentation gives the text word for word ---

#: Confirmed (AWS, "Concurrency control in Aurora DSQL"): conflicts are PostgreSQL
#: serialization failures, SQLSTATE 40001, the OCC code in the message.
CONFLICT_CODE: Final = "40001"
#: Confirmed by field reports quoting DSQL; AWS names the code, not the whole sentence.
OC000_MESSAGE: Final = "change conflicts with another transaction, please retry: (OC000)"
#: Confirmed (AWS, "DDL and distributed transactions in Aurora DSQL").
OC001_MESSAGE: Final = "schema has been updated by another transaction, please retry: (OC001)"

#: Confirmed (AWS quotas page): the three transaction limits, all SQLSTATE 54000.
LIMIT_CODE: Final = "54000"
ROW_LIMIT_MESSAGE: Final = "transaction row limit exceeded"
#: Confirmed (AWS quotas page) with the DETAIL ``Current transaction size <n>mb 10mb``.
SIZE_LIMIT_MESSAGE: Final = "transaction size limit 10mb exceeded"
SIZE_LIMIT_DETAIL: Final = "Current transaction size {size}mb 10mb"
AGE_LIMIT_MESSAGE: Final = "transaction age limit of 300s exceeded"
ROW_LIMIT: Final = 3_000
SIZE_LIMIT: Final = 10 * 1024 * 1024
AGE_LIMIT: Final = 300.0

UNSUPPORTED_CODE: Final = "0A000"
#: Unconfirmed (field reports quoting DSQL, not AWS's documentation).
MULTIPLE_DDL_MESSAGE: Final = "multiple ddl statements not supported in a transaction"
#: Unconfirmed (field reports and AWS's own Flyway and Rails adapters quoting DSQL).
DDL_DML_MESSAGE: Final = "ddl and dml are not supported in the same transaction"
#: Unconfirmed (a field report quoting DSQL).
FOREIGN_KEY_MESSAGE: Final = "FOREIGN KEY constraint not supported"
#: Unconfirmed (a field report quoting DSQL for ``ALTER TABLE ... ADD CONSTRAINT ... FOREIGN
#: KEY``).
ALTER_FOREIGN_KEY_MESSAGE: Final = "unsupported ALTER TABLE ADD CONSTRAINT statement"
#: Unconfirmed (a field report quoting DSQL): ``SERIAL`` types do not exist.
SERIAL_CODE: Final = "42704"
SERIAL_MESSAGE: Final = 'type "{type}" does not exist'
#: Unconfirmed (a field report quoting DSQL).
SEQUENCE_CACHE_MESSAGE: Final = (
    "CREATE SEQUENCE is not supported without an explicit cache size. "
    "please define CACHE greater than or equal to 65536 or equal to 1"
)
#: Unconfirmed: AWS lists these as unsupported without giving DSQL's text; ours follow
#: PostgreSQL's "<feature> not supported" under 0A000 (feature_not_supported).
SAVEPOINT_MESSAGE: Final = "SAVEPOINT not supported"
TRIGGER_MESSAGE: Final = "CREATE TRIGGER not supported"
TEMPORARY_MESSAGE: Final = "temporary tables not supported"
TRUNCATE_MESSAGE: Final = "TRUNCATE not supported"
LISTEN_MESSAGE: Final = "{command} not supported"
EXTENSION_MESSAGE: Final = "CREATE EXTENSION not supported"
#: Unconfirmed: a field report gives 42501 for ``AWS IAM GRANT`` by a role other than admin.
IAM_GRANT_DENIED_CODE: Final = "42501"
IAM_GRANT_DENIED_MESSAGE: Final = "permission denied to {command}"

_SERIAL_TYPES: Final = frozenset(
    {"SERIAL", "BIGSERIAL", "SMALLSERIAL", "SERIAL2", "SERIAL4", "SERIAL8"}
)
_DDL: Final = frozenset({"CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE"})
_DML: Final = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
_SEQUENCE_CACHE_MIN: Final = 65_536

Kind = Literal["begin", "commit", "rollback", "ddl", "dml", "iam", "other"]


@dataclass(frozen=True)
class DsqlRules:
    """Which of DSQL's refusals and behaviours a DSQL-mode emulator applies; all on by default.

    Turn one off with ``DsqlRules(savepoint=False)``, everything with :meth:`off`.

    Attributes:
        savepoint: Refuse ``SAVEPOINT``, ``RELEASE`` and ``ROLLBACK TO``.
        foreign_keys: Refuse a ``REFERENCES`` / ``FOREIGN KEY`` constraint in ``CREATE
            TABLE`` or ``ALTER TABLE ... ADD``.
        triggers: Refuse ``CREATE TRIGGER``.
        temporary_tables: Refuse ``CREATE TEMP``/``TEMPORARY`` tables.
        truncate: Refuse ``TRUNCATE``.
        listen_notify: Refuse ``LISTEN`` and ``NOTIFY`` (``UNLISTEN``, which has nothing to
            undo then, passes: asyncpg's pools send ``UNLISTEN *`` when a connection is
            released).
        extensions: Refuse ``CREATE EXTENSION``.
        sequences: Refuse ``SERIAL`` types as a column's type and ``CREATE SEQUENCE``
            without ``CACHE 1`` or ``CACHE`` of at least 65536.
        one_ddl: Refuse a second DDL statement in a transaction.
        ddl_dml_mix: Refuse DDL and DML in the same transaction.
        transaction_limits: Fail transactions past 3,000 modified rows, 10 MiB written or
            5 minutes (emulated seconds).
        occ: Optimistic concurrency: sessions run at ``REPEATABLE READ`` with a near-zero
            ``lock_timeout``, and write conflicts come back as ``40001 ... (OC000)``
            (``(OC001)`` for a schema conflict) instead of waiting.
        role_mapping: A custom role (any user but ``admin``) may only log in when the
            admin mapped it to the caller's IAM principal with ``AWS IAM GRANT``.
    """

    savepoint: bool = True
    foreign_keys: bool = True
    triggers: bool = True
    temporary_tables: bool = True
    truncate: bool = True
    listen_notify: bool = True
    extensions: bool = True
    sequences: bool = True
    one_ddl: bool = True
    ddl_dml_mix: bool = True
    transaction_limits: bool = True
    occ: bool = True
    role_mapping: bool = True

    @classmethod
    def off(cls) -> DsqlRules:
        """Return rules with everything off (the emulator before these rules existed)."""
        return cls(**{field.name: False for field in dataclasses.fields(cls)})

    @property
    def inspects_sql(self) -> bool:
        """Whether any rule needs the session's statements or results looked at."""
        return any(
            getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "role_mapping"
        )

    def replace(self, **changes: bool) -> DsqlRules:
        """Return a copy with some rules changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Refusal:
    """What a refused statement gets: an ``ERROR`` with this SQLSTATE, message and detail."""

    sqlstate: str
    message: str
    rule: str
    detail: str = ""


@dataclass(frozen=True)
class Statement:
    """One statement as the relay sees it.

    Attributes:
        kind: ``begin``, ``commit``, ``rollback``, ``ddl``, ``dml``, ``iam`` (``AWS IAM
            GRANT``/``REVOKE``) or ``other``.
        refusal: Why DSQL refuses it regardless of the transaction, if it does.
        iam: For ``iam``: ``(GRANT or REVOKE, role, ARN)``; else ``None``.
    """

    kind: Kind
    refusal: Refusal | None = None
    iam: tuple[str, str, str] | None = None


@dataclass
class _Token:
    text: str  # upper-cased for a bare word; the decoded value for a string; '"'-prefixed id
    kind: Literal["word", "string", "ident", "number", "punct"]


def split_statements(sql: str) -> list[list[_Token]]:  # noqa: C901, PLR0912, PLR0915
    """Split ``sql`` at top-level semicolons into token lists (comments dropped).

    Quoted strings (``'...'``, ``E'...'``, dollar quotes) and quoted identifiers become single
    tokens, so keywords inside them are never seen. A semicolon inside parentheses or inside
    the ``BEGIN ATOMIC ... END`` body of ``CREATE FUNCTION``/``PROCEDURE`` does not end a
    statement (psql's rule). Empty statements are left out.
    """
    statements: list[list[_Token]] = []
    current: list[_Token] = []
    parens = blocks = 0  # open parentheses; open BEGIN (and CASE inside one) of a routine body
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif c == ";" and not (parens or blocks):
            if current:
                statements.append(current)
            current = []
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "'" or (c in "eE" and sql.startswith("'", i + 1)):
            escapes = c != "'"
            i += 2 if escapes else 1
            value: list[str] = []
            while i < n:
                ch = sql[i]
                if escapes and ch == "\\" and i + 1 < n:
                    value.append(sql[i + 1])
                    i += 2
                elif ch == "'":
                    if sql.startswith("'", i + 1):
                        value.append("'")
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    value.append(ch)
                    i += 1
            current.append(_Token("".join(value), "string"))
        elif c == '"':
            end = i + 1
            value = []
            while end < n:
                if sql[end] == '"':
                    if sql.startswith('"', end + 1):
                        value.append('"')
                        end += 2
                        continue
                    break
                value.append(sql[end])
                end += 1
            current.append(_Token("".join(value), "ident"))
            i = end + 1
        elif c == "$" and (tag_end := _dollar_tag_end(sql, i)) > 0:
            tag = sql[i:tag_end]
            close = sql.find(tag, tag_end)
            close = n if close < 0 else close
            current.append(_Token(sql[tag_end:close], "string"))
            i = close + len(tag)
        elif c.isalpha() or c == "_":
            end = i + 1
            while end < n and (sql[end].isalnum() or sql[end] in "_$"):
                end += 1
            word = sql[i:end].upper()
            if not parens and word in ("BEGIN", "CASE", "END") and _routine(current):
                if word == "BEGIN" or (word == "CASE" and blocks):
                    blocks += 1
                elif word == "END" and blocks:
                    blocks -= 1
            current.append(_Token(word, "word"))
            i = end
        elif c.isdigit():
            end = i + 1
            while end < n and (sql[end].isalnum() or sql[end] == "."):
                end += 1
            current.append(_Token(sql[i:end], "number"))
            i = end
        else:
            if c == "(":
                parens += 1
            elif c == ")" and parens:
                parens -= 1
            current.append(_Token(c, "punct"))
            i += 1
    if current:
        statements.append(current)
    return statements


def _routine(tokens: list[_Token]) -> bool:
    """Tell whether ``tokens`` begin ``CREATE [OR REPLACE] FUNCTION`` or ``PROCEDURE``."""
    words = _words(tokens[:4])
    if words[2:3] == ["REPLACE"] and words[1:2] == ["OR"]:
        words = words[:1] + words[3:]
    return words[:1] == ["CREATE"] and words[1:2] in (["FUNCTION"], ["PROCEDURE"])


def _dollar_tag_end(sql: str, start: int) -> int:
    """Return the index after a dollar-quote opening tag at ``start`` (``$$``, ``$x$``), or 0."""
    end = start + 1
    while end < len(sql) and (sql[end].isalnum() or sql[end] == "_"):
        end += 1
    if end < len(sql) and sql[end] == "$" and not sql[start + 1 : end][:1].isdigit():
        return end + 1
    return 0


def _words(tokens: list[_Token]) -> list[str]:
    return [t.text if t.kind == "word" else "" for t in tokens]


def classify(tokens: list[_Token], rules: DsqlRules) -> Statement:  # noqa: C901, PLR0911
    """Return what one statement is and, if DSQL refuses it outright, why."""
    words = _words(tokens)
    first = words[0] if words else ""
    second = words[1] if len(words) > 1 else ""
    if first in ("BEGIN", "START"):
        return Statement("begin")
    if first in ("COMMIT", "END"):
        return Statement("other" if second == "PREPARED" else "commit")
    if first in ("ROLLBACK", "ABORT"):
        if "TO" in words:
            return _refuse_savepoint(rules, "other")
        return Statement("other" if second == "PREPARED" else "rollback")
    if first in ("SAVEPOINT", "RELEASE"):
        return _refuse_savepoint(rules, "other")
    if first == "AWS" and second == "IAM":
        return Statement("iam", iam=_iam_operation(tokens))
    if first == "TRUNCATE":
        refusal = Refusal(UNSUPPORTED_CODE, TRUNCATE_MESSAGE, "truncate")
        return Statement("dml", refusal if rules.truncate else None)
    if first in ("LISTEN", "NOTIFY"):  # UNLISTEN passes: asyncpg's pools send it on release
        refusal = Refusal(UNSUPPORTED_CODE, LISTEN_MESSAGE.format(command=first), "listen_notify")
        return Statement("other", refusal if rules.listen_notify else None)
    if first in _DDL:
        return Statement("ddl", _ddl_refusal(tokens, words, rules))
    if first in _DML or (first == "COPY" and "FROM" in _top_words(tokens)):
        return Statement("dml")
    if first == "WITH" and _with_modifies(tokens):
        return Statement("dml")
    return Statement("other")


def _refuse_savepoint(rules: DsqlRules, kind: Kind) -> Statement:
    refusal = Refusal(UNSUPPORTED_CODE, SAVEPOINT_MESSAGE, "savepoint")
    return Statement(kind, refusal if rules.savepoint else None)


def _ddl_refusal(  # noqa: PLR0911
    tokens: list[_Token], words: list[str], rules: DsqlRules
) -> Refusal | None:
    first = words[0]
    head = [w for w in words[1:6] if w not in ("OR", "REPLACE", "GLOBAL", "LOCAL", "UNIQUE")]
    obj = head[0] if head else ""
    if first == "CREATE":
        if rules.temporary_tables and obj in ("TEMP", "TEMPORARY"):
            return Refusal(UNSUPPORTED_CODE, TEMPORARY_MESSAGE, "temporary_tables")
        if rules.triggers and (obj == "TRIGGER" or head[:2] == ["CONSTRAINT", "TRIGGER"]):
            return Refusal(UNSUPPORTED_CODE, TRIGGER_MESSAGE, "triggers")
        if rules.extensions and obj == "EXTENSION":
            return Refusal(UNSUPPORTED_CODE, EXTENSION_MESSAGE, "extensions")
        if rules.sequences and obj == "SEQUENCE" and not _cache_allowed(tokens):
            return Refusal(UNSUPPORTED_CODE, SEQUENCE_CACHE_MESSAGE, "sequences")
        if obj == "TABLE":
            return _definitions_refusal(_table_elements(tokens), rules, alter=False)
    if first == "ALTER" and obj == "TABLE":
        return _definitions_refusal(_added_definitions(tokens), rules, alter=True)
    return None


#: Words that begin a table constraint rather than a column in ``CREATE TABLE (...)`` and
#: ``ALTER TABLE ... ADD``; all are reserved, so no column can be named so unquoted.
_CONSTRAINT_WORDS: Final = frozenset(
    {"CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "EXCLUDE", "LIKE"}
)


def _definitions_refusal(
    definitions: list[list[_Token]], rules: DsqlRules, *, alter: bool
) -> Refusal | None:
    """Refuse foreign keys and ``SERIAL`` column types among column and constraint definitions.

    Only the definitions' own keywords count (``REFERENCES``, ``FOREIGN KEY`` outside
    parentheses, the type that follows a column's name): a column, table or default named
    after them passes, as on DSQL.
    """
    if rules.foreign_keys:
        for definition in definitions:
            if _references(definition):
                if alter and _is_word(definition[0], "CONSTRAINT"):
                    return Refusal(UNSUPPORTED_CODE, ALTER_FOREIGN_KEY_MESSAGE, "foreign_keys")
                return Refusal(UNSUPPORTED_CODE, FOREIGN_KEY_MESSAGE, "foreign_keys")
    if rules.sequences:
        for definition in definitions:
            serial = _serial_type(definition)
            if serial:
                return Refusal(SERIAL_CODE, SERIAL_MESSAGE.format(type=serial), "sequences")
    return None


def _references(definition: list[_Token]) -> bool:
    """Tell whether a column or constraint definition declares a foreign key."""
    words = _top_words(definition)
    return "REFERENCES" in words or _has_pair(words, "FOREIGN", "KEY")


def _serial_type(definition: list[_Token]) -> str:
    """Return the ``SERIAL`` type (lower case) a column definition declares, else ``""``."""
    if len(definition) < 2 or _words(definition[:1])[0] in _CONSTRAINT_WORDS:  # noqa: PLR2004
        return ""
    type_ = definition[1:]
    if len(type_) > 2 and _is_word(type_[0], "PG_CATALOG") and _is_punct(type_[1], "."):  # noqa: PLR2004
        type_ = type_[2:]
    name = type_[0]
    if name.kind == "word" and name.text in _SERIAL_TYPES:
        return name.text.lower()
    if name.kind == "ident" and name.text.upper() in _SERIAL_TYPES and name.text.islower():
        return name.text  # a quoted "serial" names the same type
    return ""


def _table_elements(tokens: list[_Token]) -> list[list[_Token]]:
    """Return ``CREATE TABLE``'s column and constraint definitions (none for ``AS SELECT``)."""
    for index, token in enumerate(tokens):
        if _is_word(token, "AS"):
            return []
        if _is_punct(token, "("):
            return _split_commas(tokens[index + 1 : _closing(tokens, index)])
    return []


def _added_definitions(tokens: list[_Token]) -> list[list[_Token]]:
    """Return the column and constraint definitions an ``ALTER TABLE`` adds.

    ``ALTER TABLE [IF EXISTS] [ONLY] name [*] action, ...``: each ``ADD [COLUMN] [IF NOT
    EXISTS] definition`` action gives its definition; other actions give nothing.
    """
    words = _words(tokens)
    i = 4 if words[2:4] == ["IF", "EXISTS"] else 2
    i += 1 if words[i : i + 1] == ["ONLY"] else 0
    i += 1  # the table's name, maybe qualified
    while i + 1 < len(tokens) and _is_punct(tokens[i], "."):
        i += 2
    if i < len(tokens) and _is_punct(tokens[i], "*"):
        i += 1
    added = []
    for action in _split_commas(tokens[i:]):
        if not action or not _is_word(action[0], "ADD"):
            continue
        definition = action[1:]
        if definition and _is_word(definition[0], "COLUMN"):
            definition = definition[1:]
        if _words(definition[:3]) == ["IF", "NOT", "EXISTS"]:
            definition = definition[3:]
        if definition:
            added.append(definition)
    return added


def _with_modifies(tokens: list[_Token]) -> bool:
    """Tell whether ``WITH`` has a data-modifying ``WITH`` query or main statement.

    ``WITH [RECURSIVE] name [(columns)] AS [[NOT] MATERIALIZED] (query) [SEARCH ... | CYCLE
    ...], ... statement``: the first word of each query and of the statement decides.
    """
    i = 1
    if i < len(tokens) and _is_word(tokens[i], "RECURSIVE"):
        i += 1
    while i < len(tokens):
        named = False  # past the query's name, its column list, AS and MATERIALIZED
        while i < len(tokens) and not (named and _is_punct(tokens[i], "(")):
            named = named or _is_word(tokens[i], "AS")
            if _is_punct(tokens[i], "("):
                i = _closing(tokens, i)
            i += 1
        if i + 1 < len(tokens) and tokens[i + 1].kind == "word" and tokens[i + 1].text in _DML:
            return True
        i = _closing(tokens, i) + 1
        for clause, last in (("SEARCH", "SET"), ("CYCLE", "USING")):
            if i < len(tokens) and _is_word(tokens[i], clause):
                while i < len(tokens) and not _is_word(tokens[i], last):
                    i += 1
                i += 2
        if i < len(tokens) and _is_punct(tokens[i], ","):
            i += 1
            continue
        return i < len(tokens) and tokens[i].kind == "word" and tokens[i].text in _DML
    return False


def _is_word(token: _Token, word: str) -> bool:
    return token.kind == "word" and token.text == word


def _is_punct(token: _Token, char: str) -> bool:
    return token.kind == "punct" and token.text == char


def _closing(tokens: list[_Token], start: int) -> int:
    """Return the index of the parenthesis closing the one at ``start`` (or ``len(tokens)``)."""
    depth = 0
    for index in range(start, len(tokens)):
        token = tokens[index]
        if token.kind == "punct" and token.text in "()":
            depth += 1 if token.text == "(" else -1
            if not depth:
                return index
    return len(tokens)


def _split_commas(tokens: list[_Token]) -> list[list[_Token]]:
    """Split ``tokens`` at the commas outside parentheses."""
    parts: list[list[_Token]] = [[]]
    depth = 0
    for token in tokens:
        if token.kind == "punct":
            if token.text == "(":
                depth += 1
            elif token.text == ")":
                depth -= 1
            elif token.text == "," and not depth:
                parts.append([])
                continue
        parts[-1].append(token)
    return parts


def _top_words(tokens: list[_Token]) -> list[str]:
    """Return the keywords outside parentheses: no word after ``.`` or ``AS`` (a name there)."""
    words = []
    depth = 0
    previous = ""
    for token in tokens:
        if token.kind == "punct" and token.text == "(":
            depth += 1
        elif token.kind == "punct" and token.text == ")":
            depth -= 1
        words.append(
            token.text if not depth and token.kind == "word" and previous not in (".", "AS") else ""
        )
        previous = token.text if token.kind in ("word", "punct") else ""
    return words


def _has_pair(words: list[str], a: str, b: str) -> bool:
    return any(x == a and y == b for x, y in itertools.pairwise(words))


def _cache_allowed(tokens: list[_Token]) -> bool:
    """Tell whether ``CREATE SEQUENCE`` names a cache DSQL accepts (1, or 65536 and more)."""
    for token, value in itertools.pairwise(tokens):
        if token.kind == "word" and token.text == "CACHE" and value.kind == "number":
            try:
                cache = int(value.text)
            except ValueError:
                return False
            return cache == 1 or cache >= _SEQUENCE_CACHE_MIN
    return False


def _iam_operation(tokens: list[_Token]) -> tuple[str, str, str] | None:
    """Parse ``AWS IAM GRANT <role> TO '<arn>'`` / ``AWS IAM REVOKE <role> FROM '<arn>'``."""
    if len(tokens) != 6:  # noqa: PLR2004
        return None
    verb, role, preposition, arn = tokens[2], tokens[3], tokens[4], tokens[5]
    expected = {"GRANT": "TO", "REVOKE": "FROM"}.get(verb.text if verb.kind == "word" else "")
    if expected is None or preposition.kind != "word" or preposition.text != expected:
        return None
    if role.kind not in ("word", "ident") or arn.kind != "string":
        return None
    name = role.text.lower() if role.kind == "word" else role.text
    return verb.text, name, arn.text
