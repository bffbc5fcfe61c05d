# _attention.pxi - placeholder; filled by its own piece of work.
