# _pool.pxi - placeholder; filled by its own piece of work.
