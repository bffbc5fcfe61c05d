"""smallmind.cli - the `smallmind` command (also `python -m smallmind`): `demo` (what a bare
`smallmind` runs: train a small GPT on the built-in corpus, then generate), `train`, `generate`,
`chat`, `serve`, `info` and `bench`. docs/cli.md is the user's guide to it.

Where things are: parser.py (every option, its help and default), train.py (demo, train,
resume), use.py (generate, chat, serve), info.py (info, bench); main() below runs a command and
turns what went wrong into what the user sees:
- a mistake the user can fix (a missing file, an empty corpus, a checkpoint that is not one, a
  bad option value) prints one line, "smallmind: error: ...", and exits with status 2;
- anything else is a bug in smallmind: its traceback is printed with a line asking for a
  report, and the status is 1 (a bug must not look like the user's mistake);
- warnings print as one "smallmind: warning: ..." line; Ctrl-C exits with status 130 (`train`
  saves first and prints the command that continues the same run).
"""
import logging
import sys
import traceback
import warnings

from .. import __version__
from ._common import UserError
from .info import cmd_bench, cmd_info
from .parser import build_parser, unrecognised, with_command
from .train import cmd_demo, cmd_train
from .use import cmd_chat, cmd_generate, cmd_quantize, cmd_serve

__all__ = ["main", "UserError"]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command: one line in its own style, no source line."""
    print(f"smallmind: warning: {message}", file=sys.stderr if file is None else file)


class _WarningLines(logging.Handler):
    """Log records of WARNING and above from smallmind.* as "smallmind: warning: ..." lines,
    when the user has not asked for logging (--log-level)."""

    def emit(self, record):
        try:
            kind = "warning" if record.levelno < logging.ERROR else "error"
            sys.stderr.write(f"smallmind: {kind}: {record.getMessage()}\n")
        except Exception:
            self.handleError(record)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, parsers = build_parser()
    try:
        argv = with_command(argv, parsers)
    except UserError as e:
        ap.error(str(e))
    args, extra = ap.parse_known_args(argv)
    if extra:
        unrecognised(parsers.get(args.command, ap), extra)
    logger = logging.getLogger("smallmind")
    handler = None
    if args.log_level or args.log_json:
        from ..metrics import configure_logging
        try:
            configure_logging(args.log_level.upper() if args.log_level else "INFO", json=args.log_json)
        except ValueError as e:
            print(f"smallmind: error: --log-level: {e}", file=sys.stderr)
            return 2
    elif not logger.handlers:
        handler = _WarningLines(logging.WARNING)
        logger.addHandler(handler)
    commands = {"demo": cmd_demo, "info": cmd_info, "bench": cmd_bench, "train": cmd_train,
                "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
                "quantize": cmd_quantize}
    from ..errors import SmallMindError
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return commands[args.command](args)
    except (UserError, SmallMindError) as e:
        # a mistake the user can fix: one clear line, no traceback
        print(f"smallmind: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system or the network said no (a read-only folder, a full disk, a port in
        # use): the user's to fix, said with the path it is about
        where = f"{e.filename}: " if e.filename else ""
        print(f"smallmind: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        # a model or batch too big for this machine (--n-embd 65536, say) is a user mistake
        # too: numpy's "Unable to allocate ..." says how much was asked for
        print(f"smallmind: error: out of memory: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsmallmind: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Anything else is smallmind's bug, not the user's mistake: say so, with what a report
        # needs.
        traceback.print_exc()
        print(f"smallmind: internal error (a bug in smallmind {__version__}, not in what you "
              f"typed): please report it with the traceback above", file=sys.stderr)
        return 1
    finally:
        if handler is not None:
            logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
