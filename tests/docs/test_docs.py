"""Every code block of README.md and docs/ runs, in order, as a reader would run it.

Sybil collects the blocks. Each page is one Sybil document whose blocks share a namespace and
a working directory, and each block is one test:

- ``python``: executed in the page's namespace. A block whose first line is ``# NAME`` (a file
  name, such as ``# pool.py``) is saved as that file in the page's directory instead, for a
  later shell block to run; so is an ``ini`` block.
- ``text`` right after a ``python`` block: what that block printed, compared with it.
- ``console``: every ``$ command`` runs in one bash process, in order (a ``\\`` at the end of a
  line continues the command), and what it prints (stdout and stderr, as on a terminal) is
  compared with the lines under it. A command that fails must show it (``echo $?``).
- ``sh`` / ``bash``: run as one bash script that must succeed.

In expected output, ``...`` stands for any text (ports, paths, timings); the token's SigV4
parameters are shown as ``X-Amz-...`` in the pages and replaced by that in what a block
printed before comparing, so no token reaches a failure message. Markers, in HTML comments
that the rendered pages do not show:

- ``<!-- skip: next "why" -->`` (Sybil's): the next block is not run, for the reason given.
- ``<!-- output-not-compared: "why" -->``: the next block runs, its output is not compared.
- ``<!-- invisible-code-block: python ... -->`` (Sybil's): code run but not shown, such as
  ``docs.use("dsql")``, which sends the rest of the page's connections to the DSQL emulator,
  ``docs.use("dns")``, which resolves the example host names to the emulators in every Python
  process instead of setting ``PGHOSTADDR`` (for pages whose clients connect to a local
  proxy on 127.0.0.1, which ``PGHOSTADDR`` would redirect), or ``docs.paste_banner()``,
  which does what pasting ``iampg emulate``'s ``export`` lines does, for the emulator the
  tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import gc
import importlib.util
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer

from iampg import cli

ROOT = Path(__file__).resolve().parents[2]
RESOLVE = Path(__file__).resolve().parent / "resolve"  # sitecustomize.py, for docs.use("dns")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_TIMEOUT = 240.0  # seconds for one shell block; the slowest runs an example program
FILE_HEADER = re.compile(r"\A# (?P<name>[\w.-]+\.(?:py|ini|toml|cfg))\n")
# A token's SigV4 parameters, plain or percent-encoded (once or twice, as for alembic.ini).
TOKEN_TAIL = re.compile(r"X-Amz-[^\s'\"@]*")
ELLIPSIS = doctest.OutputChecker()


def redact(text: str) -> str:
    """Return ``text`` with every token's SigV4 parameters replaced by ``X-Amz-...``."""
    return TOKEN_TAIL.sub("X-Amz-...", text)


def same_output(expected: str, actual: str) -> bool:
    """Return whether ``actual`` matches ``expected``, where ``...`` stands for any text."""
    want = "\n".join(line.rstrip() for line in expected.strip("\n").splitlines()) + "\n"
    got = "\n".join(line.rstrip() for line in redact(actual).strip("\n").splitlines()) + "\n"
    return ELLIPSIS.check_output(want, got, doctest.ELLIPSIS)


def difference(expected: str, actual: str) -> str:
    """Return a failure message showing both outputs, the token redacted."""
    return f"expected:\n{expected.rstrip()}\n\ngot:\n{redact(actual).rstrip()}\n"


class Page:
    """What the blocks of one page share, kept in its Sybil namespace as ``docs``."""

    def __init__(self, path: Path, endpoints: Any) -> None:
        self.path = path
        self.addresses: dict[str, str] = endpoints.addresses
        self.names: dict[str, str] = endpoints.names
        self.banner: dict[str, str] = endpoints.banner
        self.directory = Path(tempfile.mkdtemp(prefix="iampg-docs-"))
        (self.directory / "examples").symlink_to(ROOT / "examples")
        self.environ: dict[str, str] = {}
        self.removed: set[str] = set()
        self.output: str | None = None  # what the last python block printed
        self.output_end = -1  # where that block ended in the page
        self.no_compare: str | None = None  # the reason the next output is not compared

    def use(self, service: str) -> None:
        """Send this page's connections to the emulator of ``service``.

        ``rds`` or ``dsql``; ``none`` unsets ``PGHOSTADDR``, for a program that starts its
        own emulator when no ``PGHOST`` is set and would take ``PGHOSTADDR`` for a setting;
        ``dns`` unsets it too and resolves the example host names to their emulators in this
        process and in every Python process the page starts (``resolve/sitecustomize.py``),
        as DNS does on a reader's machine.
        """
        for name in ("IAMPG_DOCS_RESOLVE", "PYTHONPATH"):
            if self.environ.pop(name, None) is not None:
                self.removed.add(name)
        if service == "dns":
            _install_resolver()
            self.environ.pop("PGHOSTADDR", None)
            self.removed.add("PGHOSTADDR")
            names = ",".join(f"{name}={address}" for name, address in self.names.items())
            self.environ["IAMPG_DOCS_RESOLVE"] = names
            path = os.environ.get("PYTHONPATH")
            self.environ["PYTHONPATH"] = os.pathsep.join([str(RESOLVE), *([path] if path else [])])
            self.removed.difference_update({"IAMPG_DOCS_RESOLVE", "PYTHONPATH"})
        elif service == "none":
            self.environ.pop("PGHOSTADDR", None)
            self.removed.add("PGHOSTADDR")
        else:
            self.environ["PGHOSTADDR"] = self.addresses[service]
            self.removed.discard("PGHOSTADDR")
        self.apply()

    def apply(self) -> None:
        """Put the page's variables into the environment."""
        os.environ.update(self.environ)
        for name in self.removed:
            os.environ.pop(name, None)

    def paste_banner(self) -> None:
        """Set for the rest of the page what ``iampg emulate``'s ``export`` lines set."""
        self.environ.update(self.banner)
        os.environ.update(self.environ)

    def forget_banner(self) -> None:
        """Unset for the rest of the page what :meth:`paste_banner` set."""
        for name in self.banner:
            self.environ.pop(name, None)
            os.environ.pop(name, None)
        self.environ["PGHOSTADDR"] = self.addresses["rds"]
        os.environ["PGHOSTADDR"] = self.environ["PGHOSTADDR"]

    def close(self) -> None:
        """Remove the page's directory."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _install_resolver() -> None:
    """Load ``resolve/sitecustomize.py`` here too (once): inert while its variable is unset."""
    if "iampg_docs_resolve" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "iampg_docs_resolve", RESOLVE / "sitecustomize.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def page_of(example: Example) -> Page:
    """Return the page state of ``example``'s document."""
    page: Page = example.namespace["docs"]
    return page


def saved_file(example: Example) -> bool:
    """Save a ``# NAME`` block as a file in the page's directory; return whether it was one."""
    source = str(example.parsed)
    match = FILE_HEADER.match(source)
    if match is None:
        return False
    (page_of(example).directory / match["name"]).write_text(source)
    return True


def evaluate_python(example: Example) -> str | None:
    """Run a python block in the page's namespace and keep what it printed."""
    if saved_file(example):
        return None
    page = page_of(example)
    out = io.StringIO()
    cwd = Path.cwd()
    os.chdir(page.directory)
    try:
        with contextlib.redirect_stdout(out):
            PythonEvaluator()(example)
    finally:
        os.chdir(cwd)
        page.output = out.getvalue()
        page.output_end = example.end
    return None


def evaluate_text(example: Example) -> str | None:
    """Compare a ``text`` block right after a python block with what that block printed."""
    page = page_of(example)
    reason, page.no_compare = page.no_compare, None
    between = example.document.text[page.output_end : example.start]
    if page.output_end < 0 or between.strip():
        return None  # not the output of a block: an error message, a log excerpt ...
    if reason is None and not same_output(str(example.parsed), page.output or ""):
        return difference(str(example.parsed), page.output or "")
    return None


def evaluate_ini(example: Example) -> str | None:
    """Save an ``ini`` block that names its file."""
    if not saved_file(example):
        return "an ini block must start with '# NAME', the file it is saved as"
    return None


def run_shell(script: str, page: Page) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with bash in the page's directory and environment."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("COLUMNS", None)
    return subprocess.run(
        ["bash", "-c", script],
        cwd=page.directory,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SHELL_TIMEOUT,
        check=False,
    )


def evaluate_sh(example: Example) -> str | None:
    """Run an ``sh`` or ``bash`` block as one script that must succeed."""
    result = run_shell("set -e\n" + str(example.parsed), page_of(example))
    if result.returncode != 0:
        return f"exit status {result.returncode}:\n{redact(result.stdout)}"
    return None


def console_steps(source: str) -> list[tuple[str, str]]:
    """Split a console transcript into (command, expected output) pairs."""
    steps: list[tuple[str, str]] = []
    lines = source.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("$ "):
            raise ValueError(f"console block: expected a '$ ' command, got {line!r}")
        command = [line[2:]]
        index += 1
        while command[-1].endswith("\\") and index < len(lines):
            command.append(lines[index])
            index += 1
        output = []
        while index < len(lines) and not lines[index].startswith("$ "):
            output.append(lines[index])
            index += 1
        steps.append(("\n".join(command), "\n".join(output)))
    return steps


def evaluate_console(example: Example) -> str | None:
    """Run the commands of a console block in one shell and compare what each printed."""
    page = page_of(example)
    steps = console_steps(str(example.parsed))
    script = ["status=0"]
    for number, (command, _) in enumerate(steps):
        script += [  # $? stays the previous command's, for a following 'echo $?'
            f"printf '\\n@@step {number}@@\\n'; (exit $status)",
            command,
            f"status=$?; printf '\\n@@status {number} %s@@\\n' $status",
        ]
    result = run_shell("\n".join(script), page)
    reason, page.no_compare = page.no_compare, None
    parts = re.split(r"\n@@step \d+@@\n", result.stdout)[1:]
    problems = []
    for number, (command, expected) in enumerate(steps):
        if number >= len(parts):
            problems.append(f"$ {command}\n  did not run:\n{redact(result.stdout)}")
            break
        printed, _, status = parts[number].rpartition(f"\n@@status {number} ")
        code = status.split("@@")[0]
        shows_status = number + 1 < len(steps) and steps[number + 1][0] == "echo $?"
        if code != "0" and not shows_status:
            problems.append(f"$ {command}\n  exit status {code}:\n{redact(printed)}")
        elif reason is None and not same_output(expected, printed):
            problems.append(f"$ {command}\n{difference(expected, printed)}")
    return "\n".join(problems) or None


def evaluate_output_marker(example: Example) -> None:
    """Note that the next block's output is not to be compared, and why."""
    page_of(example).no_compare = str(example.parsed) or "not said"


class OutputNotComparedParser:
    """Sybil parser for ``<!-- output-not-compared: "reason" -->``."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer(directive="output-not-compared", arguments=".+?")

    def __call__(self, document: Document) -> Iterator[Region]:
        for region in self.lexer(document):
            reason = str(region.lexemes["arguments"]).strip().strip('"')
            yield Region(region.start, region.end, reason, evaluate_output_marker)


SYBIL = Sybil(
    parsers=[
        CodeBlockParser("python", evaluate_python),
        CodeBlockParser("text", evaluate_text),
        CodeBlockParser("ini", evaluate_ini),
        CodeBlockParser("console", evaluate_console),
        CodeBlockParser("sh", evaluate_sh),
        CodeBlockParser("bash", evaluate_sh),
        SkipParser(),
        OutputNotComparedParser(),
    ],
    path="../..",
)


def _documents() -> list[Document]:
    return [SYBIL.parse(path) for path in PAGES]


DOCUMENTS = _documents()
EXAMPLES = [(index, example) for document in DOCUMENTS for index, example in enumerate(document)]
_started: dict[int, Document] = {}
_done: dict[int, int] = {}  # document id -> examples evaluated


def _block_id(item: tuple[int, Example]) -> str:
    example = item[1]
    return f"{Path(example.path).relative_to(ROOT)}:{example.line}"


def _close_page(document: Document) -> None:
    """Close what a page's code left open (pools, connections, engines), as its exit would."""
    document.namespace["docs"].close()
    for value in list(document.namespace.values()):
        module = type(value).__module__
        if module.startswith(("psycopg", "iampg")):
            closer: Callable[[], object] | None = getattr(value, "close", None)
        elif module.startswith("sqlalchemy"):
            closer = getattr(value, "dispose", None)
        else:
            continue
        # An asyncio object's close belongs to its event loop, which the page's code ended.
        if callable(closer) and not inspect.iscoroutinefunction(closer):
            with contextlib.suppress(Exception):
                closer()
    # What the page dropped without closing is collected here, not in a later page's test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _close_pages() -> None:
    while _started:
        _close_page(_started.popitem()[1])


@pytest.fixture(scope="module", autouse=True)
def _pages() -> Iterator[None]:
    """Close what the pages opened (pools, directories) when the module ends."""
    yield
    _close_pages()


def _evaluate(example: Example) -> None:
    page_of(example).apply()
    try:
        example.evaluate()
    except unittest.SkipTest as exc:  # Sybil's skip marker
        pytest.skip(str(exc))


@pytest.mark.parametrize("item", EXAMPLES, ids=_block_id)
def test_block(
    item: tuple[int, Example], docs_endpoints: Any, docs_environ: dict[str, str]
) -> None:
    """The block runs as written, and prints what the page shows after it."""
    index, example = item
    document = example.document
    if id(document) not in _started and id(document) not in _done:
        _close_pages()  # the previous page ended
        _started[id(document)] = document
        document.namespace["docs"] = Page(Path(example.path), docs_endpoints)
    examples = list(document)
    # Blocks of a page build on each other: run any earlier one not run yet (under -k).
    saved = dict(os.environ)
    try:
        for earlier in examples[_done.get(id(document), 0) : index]:
            with contextlib.suppress(pytest.skip.Exception):
                _evaluate(earlier)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _done[id(document)] = index + 1
    saved = dict(os.environ)
    try:
        _evaluate(example)
    finally:  # what the page's code set stays in the page (docs.environ), not in the process
        os.environ.clear()
        os.environ.update(saved)


def test_readme_names_every_command() -> None:
    """README.md names every ``iampg`` subcommand, as ``iampg <command>``."""
    parser = cli._parser()
    commands = next(
        action.choices
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in commands if f"`iampg {name}`" not in readme]
    assert not missing, f"README.md does not name: {missing}"
