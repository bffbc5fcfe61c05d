"""fork_pool_job.py - run by test_fork.py in a fresh interpreter: a thread holds a pool's lock
(as a rent in progress does for a moment; here for 0.5 s, through a test hook) while the main
thread forks; the child rents from that pool and exits. A child that inherited the held lock
would wait forever. Prints "ok" when the child finished. Not a test module itself."""
import os
import sys
import threading
import time

import smallmind as sm

pool = sm.default_pool() if sys.argv[1] == "default" else sm.MemoryPool()
holder = threading.Thread(target=sm._core._pool_hold_lock, args=(pool, 0.5))
holder.start()
time.sleep(0.1)                                 # the lock is held now
pid = os.fork()
if pid == 0:
    pool.rent(1 << 12).close()
    os._exit(0)
holder.join()
deadline = time.monotonic() + 20
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("ok" if os.waitstatus_to_exitcode(status) == 0 else f"status {status}")
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("the child hung")
        break
    time.sleep(0.01)
