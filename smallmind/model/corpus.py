"""corpus.py - a built-in training corpus that needs no download: the documentation that ships
inside the Python standard library itself (module, class and function docstrings, and the
language reference's help topics that pydoc shows), gathered at
run time in a fixed order, so a given Python version always yields the same text.

Only pure-Python modules that import without side effects are read (no GUI toolkits, no
`this`/`antigravity`), and each docstring is cleaned with inspect.cleandoc. About 1.3 MB.
"""
from __future__ import annotations

import importlib
import inspect
import warnings

__all__ = ["builtin_corpus", "CORPUS_MODULES"]

# Chosen for long, well-written prose and for importing cleanly on every platform.
CORPUS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server",
    "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "struct", "subprocess", "symtable", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)

_cache: dict[int, str] = {}


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
        _cache[0] = "\n\n".join(parts) + "\n"
    text = _cache[0]
    return text if max_chars is None else text[:max_chars]
