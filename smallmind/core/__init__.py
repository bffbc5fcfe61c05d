"""smallmind.core - the compiled core's Python face: the Cython extension `_core` (wrappers of the
C kernels in csrc/, GIL released), the kernel functions (`kernels`), the MemoryPool (`memory`) and
the MemoryTracker (`tracker`)."""

import importlib as _importlib
import os as _os

try:
    _importlib.import_module(__name__ + "._core")
except ModuleNotFoundError as _e:
    if _e.name != __name__ + "._core":
        raise
    # The usual cause: Python found the source tree (the current folder is the clone) before
    # the installed package. Say so, instead of a bare "No module named ...".
    _root = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    if _os.path.isfile(_os.path.join(_root, "setup.py")):
        _why = (f"Python is importing the source tree in {_root} (the current folder or "
                f"PYTHONPATH), whose C core is not compiled. Run from another folder (cd ..) to "
                f"use the installed smallmind, or compile it in place: python setup.py "
                f"build_ext --inplace")
    else:
        _why = "this installation is incomplete: reinstall smallmind (pip install --force-reinstall)"
    raise ImportError(f"smallmind's compiled core (smallmind.core._core) is missing: {_why}",
                      name=_e.name) from None

from . import _core  # noqa: E402,F401  (found above; named here for `from smallmind.core import _core`)


def _after_fork_in_child() -> None:
    # The C core's own pthread_atfork handler has already made this child single-threaded if
    # its parent ran a thread team; say so once, with what to do instead.
    if _core.fork_state()["forked_child"]:
        import warnings
        warnings.warn("this process was forked after smallmind ran OpenMP threads, which do not "
                      "survive fork(): its smallmind calls run on 1 thread here. Start worker "
                      "processes with the 'spawn' or 'forkserver' method to use more.",
                      RuntimeWarning, stacklevel=2)


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)
