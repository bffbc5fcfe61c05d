"""doc_blocks.py - reads the documentation for test_readme.py and test_docs.py: the ```python
blocks of README.md and docs/**/*.md and how to run one, their relative links, and their
headings' anchors. Not a test module itself.

A block is skipped (only compiled, not run) when the line right before its fence is
`<!-- test: skip (why) -->`: for an example that needs a server, a network or a long run.
Use it sparingly; a skipped example can go stale.
"""
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")

SKIP_MARK = re.compile(r"^<!--\s*test:\s*skip\b(.*?)-->\s*$")
_FENCE = re.compile(r"^(```|~~~)")


def markdown_files():
    """README.md and every page under docs/, as absolute paths (those that exist)."""
    files = [README] if os.path.exists(README) else []
    for folder, _, names in sorted(os.walk(DOCS)):
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".md")]
    return files


def rel(path):
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def fenced_blocks(text):
    """(info string, first line number of the code, code, the line before the fence) for each
    fenced code block of a markdown text."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), lines[i][3:].strip(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        before = lines[start - 1] if start > 0 else ""
        out.append((info, start + 2, "\n".join(lines[start + 1:j]) + "\n", before))
        i = j + 1
    return out


def python_blocks(path):
    """[(name, code, skip reason or None)] for the ```python blocks of one markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for info, line, code, before in fenced_blocks(text):
        if info.split()[:1] != ["python"]:
            continue
        m = SKIP_MARK.match(before.strip())
        reason = (m.group(1).strip(" :,-") or "marked skip") if m else None
        out.append((f"{rel(path)}:{line}", code, reason))
    return out


def prose(text, inline_code=False):
    """The text with fenced blocks taken out, and inline code too unless `inline_code` (a link
    written in code is not a link)."""
    kept, inside = [], None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if inside is None and m:
            inside = m.group(1)
            continue
        if inside is not None:
            if line.startswith(inside):
                inside = None
            continue
        kept.append(line if inline_code else re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path):
    """Every link target written in one markdown file (outside code)."""
    with open(path, encoding="utf-8") as f:
        return _LINK.findall(prose(f.read()))


def slug(heading):
    """The anchor of a heading, as GitHub and Python-Markdown's toc both make it for the
    headings these files use: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", heading.strip()))
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[\s]+", "-", text)


def anchors(path):
    """The anchors of one markdown file's headings."""
    with open(path, encoding="utf-8") as f:
        text = prose(f.read(), inline_code=True)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M)}


def run_block(code, name, skip_reason, tmp_path, monkeypatch):
    """Run one documentation example in a fresh namespace, in a temporary folder (the examples
    write checkpoints to relative paths), restoring the process-wide settings it may change. A
    block marked skip is only compiled."""
    import smallmind as sm

    compiled = compile(code, name, "exec")
    if skip_reason:
        pytest.skip(f"{name}: {skip_reason}")
    monkeypatch.chdir(tmp_path)
    threads, simd = sm.get_num_threads(), sm.simd_level()
    try:
        exec(compiled, {"__name__": "__doc_example__"})
    finally:
        sm.set_num_threads(threads)
        sm.set_simd_level(simd)
