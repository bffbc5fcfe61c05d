"""corpus.py - a built-in training corpus that needs no download: the documentation that ships
inside the Python standard library itself (module, class and function docstrings, and the
language reference's help topics that pydoc shows), gathered at
run time in a fixed order, so a given Python version always yields the same text.

Only pure-Python modules that import without side effects are read (no GUI toolkits, no
`this`/`antigravity`), and each docstring is cleaned with inspect.cleandoc. About 1.1 MB.

The text is then tidied for a character model (_clean): grid-table rows become one line each
("a: b; c"), rule lines (heading underlines, table rules) are dropped, runs of 3+ spaces inside
a line become 2, and leading indentation is halved and capped at 6. Padded tables and deep
indentation had taught the demo's model to emit runs of 100+ spaces and "| =====" fragments.
"""
from __future__ import annotations

import importlib
import inspect
import re
import warnings

__all__ = ["builtin_corpus", "CORPUS_MODULES"]

# Chosen for long, well-written prose and for importing cleanly on every platform. A package
# contributes only its own docstring (re-exports are skipped), hence the named submodules of
# asyncio, unittest and email: they keep the cleaned text over 1 MB on Python 3.9 too.
CORPUS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "asyncio.base_events", "asyncio.events",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bisect",
    "calendar", "cmd", "code", "codecs", "codeop",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email",
    "email.message", "email.policy", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server",
    "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "struct", "subprocess", "symtable", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
    "zipimport",
)

_cache: dict[int, str] = {}

# A small model cannot count a run of spaces: with indents of 8+ in the text it overshot into
# runs of 20+ when sampling; halved and capped at 6 it stays near 10 while code keeps its nesting.
_MAX_INDENT = 6
# A grid table's border or header rule: +----+----+, +====+, |====|====|
_GRID_BORDER = re.compile(r"[+|][-=+|]*[+|]")
# A heading underline or a simple table's rule: =====, -----, ~~~~, ****, ===  =====
_RULE = re.compile(r"[-=~^*#_]{3,}(?: +[-=~^*#_]{3,})*")
_INNER_SPACES = re.compile(r" {3,}")  # two spaces (after a full stop, before a # comment) stay


def _table_row(indent: str, cells: dict[int, list[str]]) -> str | None:
    """One grid-table row, its cells' lines joined: 'first: second; third'."""
    texts = [" ".join(f.strip() for f in cells[k] if f.strip()) for k in sorted(cells)]
    texts = [t for t in texts if t]
    if not texts:
        return None
    return indent + texts[0] + (": " + "; ".join(texts[1:]) if len(texts) > 1 else "")


def _clean(text: str) -> str:
    """Tables to lines, rules dropped, spaces tamed (see the module docstring)."""
    out: list[str] = []
    cols: list[int] | None = None  # positions of the column borders of the table being read
    indent = ""
    cells: dict[int, list[str]] = {}  # the current row's cell fragments, by column start

    def flush():
        if cells:
            row = _table_row(indent, cells)
            if row is not None:
                out.append(row)
            cells.clear()

    for line in text.split("\n"):
        s = line.strip()
        if len(s) >= 3 and ("-" in s or "=" in s) and _GRID_BORDER.fullmatch(s):
            flush()  # a border ends the row above it
            cols = [i for i, c in enumerate(line) if c in "+|"]
            indent = line[: len(line) - len(line.lstrip())]
            continue
        if cols is not None and len(s) >= 2 and s[0] == "|" and s[-1] == "|":
            # A cell spanning columns has no '|' at the borders it spans: use those present.
            bounds = [p for p in cols if p < len(line) and line[p] == "|"]
            for a, b in zip(bounds, bounds[1:]):
                cells.setdefault(a, []).append(line[a + 1:b])
            continue
        flush()
        cols = None
        if _RULE.fullmatch(s):
            continue
        out.append(line)
    flush()

    lines = []
    for line in out:
        body = line.strip()
        pad = min((len(line) - len(line.lstrip(" ")) + 1) // 2, _MAX_INDENT) if body else 0
        lines.append(" " * pad + _INNER_SPACES.sub("  ", body))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _docs_of(mod) -> list[str]:
    out = []
    doc = inspect.getdoc(mod)
    if doc:
        out.append(doc)
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if getattr(obj, "__module__", None) != mod.__name__:
            continue  # re-exports are documented where they are defined
        if inspect.isclass(obj) or inspect.isfunction(obj):
            d = obj.__doc__
            if d and len(d) > 40:
                out.append(f"{name}\n{inspect.cleandoc(d)}")
            if inspect.isclass(obj):
                for mname in sorted(vars(obj)):
                    meth = vars(obj)[mname]
                    if mname.startswith("_") or not inspect.isfunction(meth):
                        continue
                    d = meth.__doc__
                    if d and len(d) > 40:
                        out.append(f"{name}.{mname}\n{inspect.cleandoc(d)}")
    return out


def builtin_corpus(max_chars: int | None = None) -> str:
    """The standard library's documentation as one text (paragraphs separated by blank lines),
    deterministic for a given Python version; cut to max_chars if given."""
    if 0 not in _cache:
        parts: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in CORPUS_MODULES:
                try:
                    mod = importlib.import_module(name)
                except Exception:  # a module missing from a trimmed Python: skip it
                    continue
                parts.extend(_docs_of(mod))
            try:  # the language reference's help topics, as pydoc shows them
                from pydoc_data.topics import topics
                parts.extend(topics[k].strip() for k in sorted(topics))
            except Exception:
                pass
        parts = [c for c in map(_clean, parts) if c]
        _cache[0] = "\n\n".join(parts) + "\n"
    text = _cache[0]
    return text if max_chars is None else text[:max_chars]
