"""_threadpool.py - lets threadpoolctl see and limit smallmind's thread budget.

threadpoolctl finds native libraries among the loaded shared objects. Our extension module
exports `smallmind_get_num_threads` / `smallmind_set_num_threads`; this controller tells
threadpoolctl how to drive them, so `threadpool_limits(1)` also limits smallmind (user_api
"smallmind"). OpenMP's own controller sees the libgomp/libomp we link as well. Nothing happens
when threadpoolctl is not installed.
"""
try:
    from threadpoolctl import LibController, register
except ImportError:  # threadpoolctl is optional
    LibController = None

if LibController is not None:

    class SmallMindController(LibController):
        user_api = "smallmind"
        internal_api = "smallmind"
        filename_prefixes = ("_core.",)
        check_symbols = ("smallmind_get_num_threads", "smallmind_set_num_threads")

        def get_num_threads(self):
            return self.dynlib.smallmind_get_num_threads()

        def set_num_threads(self, num_threads):
            self.dynlib.smallmind_set_num_threads(int(num_threads))

        def get_version(self):
            from .. import __version__

            return __version__

    register(SmallMindController)
