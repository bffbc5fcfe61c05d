"""test_packaging.py - the compiled core as built (in place, installed from the sdist or from a
wheel): it links libm itself, carries no run-time search path of the building machine, and its
type stub names what the module holds. The full wheel and sdist checks are tools/check_wheel.sh."""
import ast
import os
import platform
import re
import shutil
import subprocess
import sys
import types

import pytest

from smallmind.core import _core

STUB = os.path.join(os.path.dirname(_core.__file__), "_core.pyi")

elf = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                         reason="ELF checks: Linux with readelf (binutils) only")


def _dynamic(tag):
    out = subprocess.run(["readelf", "-d", _core.__file__], capture_output=True, text=True,
                         check=True).stdout
    return [line.split("[", 1)[1].rsplit("]", 1)[0] for line in out.splitlines()
            if f"({tag})" in line]


@elf
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="libm is a library of its own on glibc")
def test_core_links_libm():
    # exp, log, tanh, ... come from libm: the core must not rely on the interpreter loading it
    assert "libm.so.6" in _dynamic("NEEDED")


@elf
@pytest.mark.skipif(re.search(r"-Wl,(--?rpath[,=]|-R)", os.environ.get("LDFLAGS", "")) is not None,
                    reason="LDFLAGS asks for an rpath: setup.py keeps the builder's own")
def test_core_has_no_foreign_runpath():
    # setup.py drops the interpreter's -Wl,-rpath (pyenv: <prefix>/lib); the only search path
    # allowed is auditwheel's, inside the installed wheel ($ORIGIN/../../smallmind.libs)
    paths = [p for tag in ("RUNPATH", "RPATH") for v in _dynamic(tag) for p in v.split(":")]
    assert all(p.startswith("$ORIGIN") for p in paths), paths


@pytest.mark.skipif(not os.path.exists(STUB), reason="no _core.pyi next to the compiled core")
def test_stub_names_match_the_module():
    tree = ast.parse(open(STUB, encoding="utf-8").read())
    stub = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stub.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stub.add(node.target.id)
    # names for the type checker only: aliases and @type_check_only TypedDicts
    aliases = {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)
               and isinstance(n.target, ast.Name) and "TypeAlias" in ast.unparse(n.annotation)}
    checker_only = {n.name for n in tree.body if isinstance(n, ast.ClassDef)
                    and any("type_check_only" in ast.unparse(d) for d in n.decorator_list)}
    runtime = {n for n in dir(_core) if not n.startswith("__")
               and not isinstance(getattr(_core, n), types.ModuleType)
               and getattr(getattr(_core, n), "__module__", _core.__name__) == _core.__name__}
    assert sorted(runtime - stub) == [], "in the module, missing from _core.pyi"
    assert sorted(stub - aliases - checker_only - runtime) == [], "in _core.pyi, not in the module"
