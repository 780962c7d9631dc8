"""Sphinx configuration for the iampg documentation (MyST Markdown, furo, autodoc)."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from typing import Any, ClassVar

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import iampg

project = "iampg"
author = "The iampg developers"
copyright = "the iampg developers"
release = iampg.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# MyST: ```{directive}``` fences, :::{note} blocks, anchors for headings up to level 3.
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3

# autodoc: signatures as written, the docstrings' own Args/Returns/Raises (Google style).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"iampg {release}"
html_static_path = ["_static"]
html_show_sourcelink = False

# Public names that must appear in the API reference: a new export without a page fails the
# build (sphinx-build -W), so the reference never silently falls behind ``__all__``.
_DOCUMENTED_MODULES = ("iampg", "iampg.emulator", "iampg.proxy")


def _check_reference(_app: Sphinx, env: Any) -> None:
    """Warn about every public name of ``_DOCUMENTED_MODULES`` missing from the reference."""
    documented = set(env.get_domain("py").objects)
    log = logging.getLogger("iampg.docs")
    for modname in _DOCUMENTED_MODULES:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            if f"{modname}.{name}" not in documented:
                log.warning("%s.%s is exported but missing from reference.md", modname, name)


def _cli_help(argv: list[str]) -> str:
    """Return what ``iampg ARGV --help`` prints, 100 columns wide."""
    from iampg import cli  # noqa: PLC0415 -- imported when a page asks for it

    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main([*argv, "--help"])
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return out.getvalue().rstrip()


def _cli_commands() -> list[str]:
    """Return the names of the ``iampg`` subcommands."""
    import argparse  # noqa: PLC0415

    from iampg import cli  # noqa: PLC0415

    parser = cli._parser()  # noqa: SLF001 -- the docs render the real parser
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return list(action.choices)
    return []


class CliHelp(SphinxDirective):
    """``iampg-help [COMMAND]``: the command's ``--help`` output, rendered at build time."""

    optional_arguments: ClassVar[int] = 1

    def run(self) -> list[nodes.Node]:
        """Return the help text as a literal block, and note the command as documented."""
        argv = list(self.arguments)
        text = _cli_help(argv)
        documented = self.env.__dict__.setdefault("iampg_cli_documented", {})
        documented.setdefault(self.env.docname, set()).update(argv or [""])
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _purge_cli(_app: Sphinx, env: Any, docname: str) -> None:
    env.__dict__.get("iampg_cli_documented", {}).pop(docname, None)


def _check_cli(_app: Sphinx, env: Any) -> None:
    """Warn about every ``iampg`` subcommand whose ``--help`` is not on a page."""
    documented: set[str] = set()
    for names in env.__dict__.get("iampg_cli_documented", {}).values():
        documented |= names
    log = logging.getLogger("iampg.docs")
    for command in _cli_commands():
        if command not in documented:
            log.warning("iampg %s has no iampg-help block in cli.md", command)


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the CLI help directive and the reference and CLI completeness checks."""
    app.add_directive("iampg-help", CliHelp)
    app.connect("env-purge-doc", _purge_cli)
    app.connect("env-check-consistency", _check_reference)
    app.connect("env-check-consistency", _check_cli)
    return {"parallel_read_safe": False}
