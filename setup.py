"""Build script for smallmind: compiles csrc/*.c and the Cython wrapper into smallmind.core._core.

OpenMP is detected by test-compiling a tiny program with the active compiler; SMALLMIND_OPENMP=0
builds without it (single-threaded). SIMD kernels are compiled with per-function target
attributes, so no -march flag is ever passed: one wheel runs on any x86-64 and picks its
micro-kernels from CPUID at run time. No -ffast-math: results must be reproducible.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    # pip shows build output with -v; stderr also reaches logs of cibuildwheel and CI.
    print(f"smallmind: {msg}", file=sys.stderr, flush=True)


def _macos_libomp_prefix():
    """Where Homebrew (or the user, via SMALLMIND_LIBOMP_PREFIX) keeps libomp on macOS."""
    prefix = os.environ.get("SMALLMIND_LIBOMP_PREFIX")
    if prefix:
        return prefix
    brew = shutil.which("brew")
    if brew:
        try:
            out = subprocess.run([brew, "--prefix", "libomp"], capture_output=True, text=True, check=True)
            return out.stdout.strip() or None
        except (OSError, subprocess.CalledProcessError):
            return None
    return None


def _openmp_candidates(compiler_type):
    """(compile_args, link_args, description) to try, best first."""
    if compiler_type == "msvc":
        # OpenMP 2.0 subset only: the C core uses `parallel` regions and omp_get_thread_num.
        return [(["/openmp"], [], "/openmp")]
    if sys.platform == "darwin":
        cands = []
        prefix = _macos_libomp_prefix()
        if prefix:
            cands.append((
                ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"],
                [f"-L{prefix}/lib", "-lomp", f"-Wl,-rpath,{prefix}/lib"],
                f"-Xpreprocessor -fopenmp with libomp from {prefix}",
            ))
        cands.append((["-fopenmp"], ["-fopenmp"], "-fopenmp"))
        return cands
    return [(["-fopenmp"], ["-fopenmp"], "-fopenmp")]


def _try_openmp(compiler, cargs, largs):
    code = ("#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel\n"
            "{n=omp_get_num_threads();}\nreturn n>0?0:1;}\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_check.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cargs)
            # LDFLAGS reach shared-object links but not executables: pass them to the probe too,
            # so e.g. sanitizer builds detect OpenMP the same way the real link will see it.
            env_ld = os.environ.get("LDFLAGS", "").split()
            compiler.link_executable(objs, "omp_check", output_dir=tmp, extra_postargs=largs + env_ld)
        except Exception:  # any compile/link failure means "not available"
            return False
    return True


# A linker flag that records a run-time search path in the library (DT_RUNPATH / DT_RPATH):
# -Wl,-rpath,DIR  -Wl,-rpath=DIR  -Wl,--rpath,DIR  -Wl,-R,DIR  -Wl,-RDIR (not -Wl,-rpath-link).
_RPATH_FLAG = re.compile(r"^-Wl,(--?rpath[,=]|-R)")


def _drop_inherited_rpaths(compiler):
    """Removes the run-time search paths the linker command inherited from the interpreter's build.

    The shared-object link command comes from sysconfig's LDSHARED, which carries the LDFLAGS
    the interpreter itself was configured with: pyenv's or a source-built Python's
    `-Wl,-rpath,<prefix>/lib`. Left there, it becomes a RUNPATH in our library that points at the
    building machine's interpreter folder, meaningless where the wheel is installed (and
    auditwheel would have to rewrite it). The extension needs no search path of its own:
    libm, libc and libgomp are system libraries, bundled into wheels by auditwheel/delocate.
    rpath flags the builder passes explicitly (LDFLAGS or LDSHARED in the environment) are kept.
    """
    linker = getattr(compiler, "linker_so", None)
    if not linker:  # MSVC: no such command, and no rpaths on Windows
        return
    asked = set(os.environ.get("LDFLAGS", "").split() + os.environ.get("LDSHARED", "").split())
    dropped = [w for w in linker if _RPATH_FLAG.match(w) and w not in asked]
    if dropped:
        compiler.set_executable("linker_so", [w for w in linker if w not in dropped])
        _log("dropped the interpreter's run-time search paths from the link: "
             + " ".join(sorted(set(dropped))))


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            cflags = ["/O2", "/fp:precise"]
        else:
            # -ffp-contract=off: scalar code is never silently fused into FMAs, so the generic
            # path gives the same bits whatever the compiler decides; SIMD kernels use explicit FMAs.
            cflags = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-ffp-contract=off",
                      "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"]
            # Python's own CFLAGS add -g; -g0 keeps debug info out of wheels (4.5 MB -> 0.7 MB)
            # unless the builder asks for it in CFLAGS (sanitizer and debugger builds).
            if "-g" not in os.environ.get("CFLAGS", "").split():
                cflags.append("-g0")
        ldflags = []
        libraries = []
        macros = []
        if ctype != "msvc":
            # The kernels call exp, log, tanh, ... from libm: link it explicitly rather than rely
            # on the interpreter having loaded it first (a statically linked Python may not).
            libraries.append("m")
            # Strip the symbol table from the shipped library (-s: 1.17 -> 1.08 MB on x86-64)
            # unless the builder asks for debug info with -g in CFLAGS, as for -g0 above: the
            # sanitizer, valgrind and debugger builds keep their symbols. The exported PyInit__core
            # is in the dynamic symbol table, which -s keeps. Apple's ld treats -s as obsolete.
            if sys.platform != "darwin" and "-g" not in os.environ.get("CFLAGS", "").split():
                ldflags.append("-s")
        _drop_inherited_rpaths(self.compiler)

        want = os.environ.get("SMALLMIND_OPENMP", "1").strip().lower() not in ("0", "false", "no", "off")
        found = None
        if want:
            for cargs, largs, desc in _openmp_candidates(ctype):
                if _try_openmp(self.compiler, cargs, largs):
                    found = (cargs, largs, desc)
                    break
        if found:
            cflags += found[0]
            ldflags += found[1]
            macros.append(("SM_HAVE_OPENMP", "1"))
            _log(f"OpenMP enabled ({found[2]})")
        elif want:
            _log("OpenMP NOT found: building single-threaded (install libgomp/libomp for threads)")
        else:
            _log("OpenMP disabled by SMALLMIND_OPENMP=0: building single-threaded")

        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + cflags
            ext.extra_link_args = list(ext.extra_link_args or []) + ldflags
            ext.libraries = list(ext.libraries or []) + libraries
            ext.define_macros = list(ext.define_macros or []) + macros
        super().build_extensions()


def extensions():
    import numpy
    from Cython.Build import cythonize

    sources = ["smallmind/core/_core.pyx"] + sorted(glob.glob("csrc/*.c"))
    ext = Extension("smallmind.core._core", sources=sources, include_dirs=["csrc", numpy.get_include()],
                    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
                    depends=sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("smallmind/core/*.pxi"))
                    + ["smallmind/core/_core.pxd"])
    return cythonize(
        [ext],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "initializedcheck": False, "cdivision": True, "embedsignature": True},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
