"""test_docs.py - the pages under docs/ stay true: their Python examples run as written (as
test_readme.py runs the README's), every relative link of README.md and docs/ points to a file
(and heading) that exists, the hand-written API pages match the compiled core's real
signatures, and the tables that restate code (presets, configuration defaults) match it."""
import dataclasses
import importlib
import inspect
import os
import re
import sys

import pytest

import smallmind as sm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_blocks import DOCS, README, ROOT, anchors, fenced_blocks, links, markdown_files, python_blocks, rel, run_block  # noqa: E402

if not os.path.isdir(DOCS):
    pytest.skip("no docs/ folder in this copy", allow_module_level=True)

_PAGES = [p for p in markdown_files() if p != README]
_BLOCKS = [b for p in _PAGES for b in python_blocks(p)]


def _read(*parts):
    with open(os.path.join(DOCS, *parts), encoding="utf-8") as f:
        return f.read()


def _api_text():
    return "".join(_read("api", n) for n in sorted(os.listdir(os.path.join(DOCS, "api")))
                   if n.endswith(".md"))


# ---- the examples run -----------------------------------------------------------------------

@pytest.mark.parametrize("name,code,skip", _BLOCKS, ids=[b[0] for b in _BLOCKS])
def test_docs_python_block_runs(name, code, skip, tmp_path, monkeypatch):
    run_block(code, name, skip, tmp_path, monkeypatch)


def test_docs_have_examples():
    # a broken fence parser would find none, and the parametrized test above would pass empty
    assert len(_BLOCKS) >= 10, [b[0] for b in _BLOCKS]
    assert sum(skip is not None for _, _, skip in _BLOCKS) <= 2, "use the skip mark sparingly"


def test_skip_mark_is_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- test: skip (needs a server) -->\n```python\nx = 1\n```\n\n"
                    "```python\ny = 2\n```\n", encoding="utf-8")
    (a, _, skip_a), (b, code_b, skip_b) = python_blocks(str(page))
    assert skip_a == "(needs a server)" and skip_b is None and code_b == "y = 2\n"
    assert a.endswith(":4") and b.endswith(":8")


def test_every_page_says_what_it_is():
    for path in _PAGES:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        assert lines[0].startswith("# "), f"{rel(path)} does not start with a title"
        assert lines[1] == "" and len(lines[2].split()) >= 5, \
            f"{rel(path)}: the title should be followed by a line saying what the page is"


def test_every_page_is_in_the_site():
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", f.read(), flags=re.M)
    pages = {os.path.relpath(p, DOCS).replace(os.sep, "/") for p in _PAGES}
    assert pages == set(nav), f"not in mkdocs.yml's nav: {pages - set(nav)}; missing: {set(nav) - pages}"


# ---- links ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", markdown_files(), ids=rel)
def test_relative_links_resolve(path):
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):      # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            bad.append(f"{target}: no such file")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {rel(dest)}")
    assert not bad, f"{rel(path)}: " + "; ".join(bad)


def test_link_checker_sees_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# T\n\nSee [a](a.md), [b](#t) and `[not](code.md)`.\n\n```\n[no](x.md)\n```\n",
                    encoding="utf-8")
    assert links(str(page)) == ["a.md", "#t"]
    assert anchors(str(page)) == {"t"}


# ---- the API reference ---------------------------------------------------------------------

def _compiled(obj):
    """True for what lives in the compiled core, which the docs build cannot import."""
    return (getattr(obj, "__module__", "") or "").split(".")[-1] == "_core"


def test_every_public_name_is_documented():
    text = _api_text()
    documented = set(re.findall(r"^::: smallmind\.(\w+)", text, flags=re.M))
    documented |= set(re.findall(r"^## `smallmind\.(\w+)", text, flags=re.M))
    if "smallmind.kernels.__all__" in _read("api", "kernels.md"):
        documented.add("kernels")
    missing = set(sm.__all__) - documented
    assert not missing, f"public names missing from docs/api: {sorted(missing)}"


def test_mkdocstrings_targets_are_public_and_not_compiled():
    """`::: smallmind.X` must name a public, pure-Python object: a compiled one renders only
    where the core happens to be built in place (and fails `mkdocs build --strict` in CI)."""
    for target in re.findall(r"^::: ([\w.]+)", _api_text(), flags=re.M):
        parts = target.split(".")
        # public: re-exported by smallmind, or a public module (distributed: MPI is optional)
        assert parts[0] == "smallmind" and (parts[1] in sm.__all__
                                            or parts[1] in ("corpus", "distributed")), target
        assert not any(p.startswith("_") for p in parts), target
        obj = importlib.import_module(f"smallmind.{parts[1]}") if parts[1] not in sm.__all__ else sm
        for p in parts[1 if parts[1] in sm.__all__ else 2:]:
            obj = getattr(obj, p)
        assert not _compiled(obj), f"{target} is compiled: document it by hand"


def _params(fn, drop_self=False):
    sig = inspect.signature(fn)
    if drop_self:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return str(sig)


def test_hand_written_pages_match_the_compiled_core():
    text = _read("api", "runtime.md") + _read("api", "memory.md")
    compiled = [n for n in sm.__all__ if _compiled(getattr(sm, n))]
    assert {"build_info", "set_num_threads", "MemoryPool"} <= set(compiled)
    for name in compiled:
        obj = getattr(sm, name)
        if inspect.isclass(obj):
            assert f"## `smallmind.{name}" in text, name
            short = {"MemoryPool": "pool", "PooledBuffer": "buf"}[name]
            for attr in (a for a in dir(obj) if not a.startswith("_")):
                member = getattr(obj, attr)
                shown = f"`{short}.{attr}{_params(member, drop_self=True)}`" if callable(member) \
                    else f"`{short}.{attr}`"
                assert shown in text, f"{name}.{attr}: expected {shown} in docs/api"
        else:
            assert f"## `smallmind.{name}{_params(obj)}`" in text, name
    with sm.MemoryPool() as pool:       # the defaults the page's heading states
        size = pool.max_buffer_size.bit_length() - 1
        assert pool.max_buffer_size == 1 << size
        assert (f"## `smallmind.MemoryPool(max_buffer_size=1 << {size}, max_buffers_per_bucket="
                f"{pool.max_buffers_per_bucket}, max_pooled_bytes={pool.max_pooled_bytes})`") in text


def test_kernels_page_matches_the_kernels():
    text = _read("api", "kernels.md")
    for name in sm.kernels.__all__:
        obj = getattr(sm.kernels, name)
        shown = f"`{name}{_params(obj)}`" if callable(obj) else f"`{name}`"
        assert shown in text, f"expected {shown} in docs/api/kernels.md"


# ---- tables that restate code --------------------------------------------------------------

def test_readme_presets_match_the_code():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    found = {m[0]: tuple(int(x) for x in m[1:])
             for m in re.findall(r"`([\w-]+)`\s+(\d+)/(\d+)/(\d+),\s+(\d+)", text)}
    assert found == {name: (p["n_layer"], p["n_head"], p["n_embd"], p["block_size"])
                     for name, p in sm.PRESETS.items()}


def test_configuration_table_matches_the_defaults():
    from smallmind.config import Settings

    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+?) \|", _read("cli.md"), flags=re.M)
    table = {(section, field): default for section, field, default in rows}
    settings = Settings()
    expected = {}
    for section in ("model", "training", "inference", "server"):
        for f in dataclasses.fields(getattr(settings, section)):
            expected[(section, f.name)] = getattr(getattr(settings, section), f.name)
    assert set(table) == set(expected)
    for key, written in table.items():
        value = expected[key]
        if written in ("none", "automatic"):
            assert value is None, key
        else:
            literal = written.strip("`")
            parsed = eval(literal, {})       # the table's values are Python / TOML literals
            assert (tuple(parsed) if isinstance(parsed, list) else parsed) == value, key


def test_benchmark_shapes_use_one_set_of_names():
    """A preset's name in a benchmark table means that preset's shape (docs/benchmarks.md
    calls other shapes by their sizes)."""
    text = _read("benchmarks.md") + _read("reliability.md")
    for name, layers, heads, width in re.findall(r"\b([a-z][\w-]*) \((\d+)/(\d+)/(\d+)[,)]", text):
        if name in sm.PRESETS:
            p = sm.PRESETS[name]
            assert (int(layers), int(heads), int(width)) == (p["n_layer"], p["n_head"], p["n_embd"]), name
    # a table row naming a preset must give its shape (checked against the preset above)
    for m in re.finditer(r"\| (tiny|small) \(", text):
        assert re.match(r"\d+/\d+/\d+[,)]", text[m.end():]), f"{m.group(1)} row without its shape"


def test_fenced_blocks_parser():
    blocks = fenced_blocks("a\n```bash\nls\n```\n```python\nx = 1\n```\n")
    assert [(info, code) for info, _, code, _ in blocks] == [("bash", "ls\n"), ("python", "x = 1\n")]
