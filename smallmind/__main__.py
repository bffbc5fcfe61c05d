"""__main__.py - `python -m smallmind` runs the command line (smallmind/cli.py)."""
import sys

from .cli import main

sys.exit(main())
