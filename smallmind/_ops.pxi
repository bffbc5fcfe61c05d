# _ops.pxi - placeholder; filled by its own piece of work.
