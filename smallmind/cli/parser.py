"""parser.py - the command line's argparse parsers: every option with what it does and its
default, an example per command, and the two fixes argparse needs here (an option before the
command is an error saying where it goes; an unknown option gets its command's usage and the
nearest option it does take)."""
import argparse
import difflib
import os
import sys
import textwrap

from .. import __version__
from ._common import UserError
from .train import TEXT_SUFFIXES


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error reported as "smallmind: error: ..." after the usage of
    the (sub)command it is about."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"smallmind: error: {message}\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the examples; wider option column."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _default(section, name):
    """The default the command starts from for [section] name (for help texts)."""
    from ..config import CLI_DEFAULTS, Settings
    value = CLI_DEFAULTS.get(section, {}).get(name)
    return getattr(getattr(Settings(), section), name) if value is None else value


_EXAMPLES = {
    "demo": """example:
  smallmind demo --steps 300 --prompt 'def '""",
    "train": """examples:
  smallmind train notes/ more.txt --preset tiny --steps 2000 --checkpoint-dir ck
  # Ctrl-C saves ck/model_cancelled.safetensors and prints the command that continues the run:
  smallmind train --resume ck/model_cancelled.safetensors
  smallmind train --resume ck --steps 3000          # the same run, longer
  smallmind train new.txt --resume ck --new-data    # fine-tune the run's model on other text

On --resume, the run's text, folder and options come from its checkpoint; flags given
override them. Options are read from (highest first): flags, SMALLMIND_TRAINING_* /
SMALLMIND_MODEL_* variables, --config FILE, the resumed run's own, the defaults shown.""",
    "generate": """examples:
  smallmind generate ck --prompt 'def ' --max-tokens 200
  smallmind generate ck/model_last.safetensors --temperature 0 --stop '\\n\\n'""",
    "chat": """example:
  smallmind chat ck --temperature 0.7
  echo 'The cat' | smallmind chat ck      # from a pipe: one prompt per line""",
    "serve": """example:
  smallmind serve ck --port 8000 --max-concurrency 4
  curl localhost:8000/v1/completions -d '{"prompt": "The ", "max_tokens": 20}'""",
    "quantize": """examples:
  smallmind quantize ck ck-int8.safetensors                 # int8, one scale per output
  smallmind quantize gpt2-folder gpt2-bf16.safetensors --dtype bf16
  smallmind generate ck-int8.safetensors --prompt 'The '    # loads as int8""",
    "info": """examples:
  smallmind info
  smallmind info --config smallmind.toml""",
    "bench": """example:
  smallmind bench          # bench/ in the source has the full comparisons with PyTorch""",
}

_MODEL_ARG = ("a checkpoint: a .safetensors file written by train, a run's folder (its "
              "model_best, else the newest of model_last / model_cancelled), or a Hugging Face "
              "GPT-2 folder (config.json, model.safetensors and tokenizer files)")
_CONFIG_HELP = ("a TOML file of options, in sections [model] [training] [inference] [server] "
                "(docs/cli.md lists them; `smallmind info --config FILE` shows the result)")


def _sub(sub, name, helptext, description):
    # allow_abbrev=False: "--step 7" is a typo to point out, not a prefix of --steps to guess
    return sub.add_parser(name, help=helptext, description=textwrap.fill(description, 88),
                          allow_abbrev=False,
                          epilog=_EXAMPLES[name], formatter_class=_Help)


def build_parser():
    """(the top-level parser, {command: its parser})."""
    ap = _Parser(prog="smallmind", formatter_class=_Help, allow_abbrev=False,
                 description="smallmind: small GPT models trained and served on the CPU. "
                             "With no command, runs `demo`.",
                 epilog="examples:\n  smallmind                      # the demo\n"
                        "  smallmind train mytext.txt --steps 2000 --checkpoint-dir ck\n"
                        "  smallmind generate ck --prompt 'The '\n"
                        "  smallmind COMMAND --help         # a command's options")
    ap.add_argument("--version", action="version", version=f"smallmind {__version__}")
    ap.add_argument("--log-level", default=None, metavar="LEVEL",
                    help="log the smallmind.* loggers at LEVEL: DEBUG, INFO, WARNING "
                         "(default: warnings only, one line each)")
    ap.add_argument("--log-json", action="store_true",
                    help="log as one JSON object per line (default: plain lines)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}

    p = parsers["demo"] = _sub(sub, "demo", "train on the built-in corpus, then generate "
                               "(what a bare `smallmind` runs)",
                               "Train a small GPT on the built-in corpus (the Python standard "
                               "library's documentation, no download), then generate from it.")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default: 800)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    p.add_argument("--block-size", type=int, default=64, help="context length (default: 64)")
    p.add_argument("--n-layer", type=int, default=4, help="transformer layers (default: 4)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--n-embd", type=int, default=128, help="model width (default: 128)")
    p.add_argument("--learning-rate", type=float, default=2e-3,
                   help="peak learning rate (default: 0.002)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--log-every", type=int, default=100,
                   help="steps between progress lines (default: 100)")
    p.add_argument("--tokens", type=int, default=300,
                   help="characters to generate (default: 300)")
    p.add_argument("--prompt", default="The ", help="text to continue (default: 'The ')")
    p.add_argument("--checkpoint-dir", default="smallmind-demo",
                   help="where the trained model is saved, '' for nowhere "
                        "(default: smallmind-demo)")

    p = parsers["train"] = _sub(sub, "train", "train on text files, a folder or the built-in "
                                "corpus", "Train a GPT on your text, with a progress line, "
                                "evaluation, checkpoints, and Ctrl-C that saves.")
    p.add_argument("data", nargs="*", metavar="FILE_OR_FOLDER",
                   help=f"text files, or folders of them ({', '.join(TEXT_SUFFIXES)}); "
                        f"default: the built-in corpus, or the resumed run's text")
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    g = p.add_argument_group("the model (a new run)")
    from ..model.transformer import PRESETS
    g.add_argument("--preset", metavar="NAME",
                   help=f"a model preset: {', '.join(sorted(PRESETS))} (default: none, the "
                        f"sizes below)")
    g.add_argument("--n-layer", type=int, help=f"transformer layers (default: "
                   f"{_default('model', 'n_layer')})")
    g.add_argument("--n-head", type=int, help=f"attention heads (default: "
                   f"{_default('model', 'n_head')})")
    g.add_argument("--n-embd", type=int, help=f"model width, a multiple of --n-head (default: "
                   f"{_default('model', 'n_embd')})")
    g.add_argument("--block-size", type=int, help=f"context length in tokens (default: "
                   f"{_default('model', 'block_size')})")
    g.add_argument("--tokenizer", choices=("char", "bpe"),
                   help="char: one id per character of the text; bpe: learn a byte-level BPE "
                        "vocabulary of --vocab-size ids from the text first (default: "
                        f"{_default('model', 'tokenizer')})")
    g.add_argument("--vocab-size", type=int, help=f"ids of the BPE vocabulary (default: "
                   f"{_default('model', 'vocab_size')})")
    g.add_argument("--init", metavar="FOLDER",
                   help="start from this model instead of random weights (fine-tuning): a "
                        "Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer "
                        "files) or a smallmind checkpoint; its sizes and tokenizer are kept "
                        "(default: random weights)")
    g = p.add_argument_group("the run")
    g.add_argument("--steps", type=int, help=f"optimizer steps in all, counting those a resumed "
                   f"run has done (default: {_default('training', 'steps')})")
    g.add_argument("--batch-size", type=int, help=f"windows per step (default: "
                   f"{_default('training', 'batch_size')})")
    g.add_argument("--grad-accum-steps", type=int, help=f"micro-batches of --batch-size "
                   f"windows per step (the global batch is their product, also under mpirun, "
                   f"where the ranks share it) (default: "
                   f"{_default('training', 'grad_accum_steps')})")
    g.add_argument("--learning-rate", type=float, help=f"peak learning rate, reached after the "
                   f"warm-up, then a cosine to a tenth of it (default: "
                   f"{_default('training', 'learning_rate')})")
    g.add_argument("--warmup", type=int, dest="warmup_steps", help=f"warm-up steps (default: "
                   f"{_default('training', 'warmup_steps')})")
    g.add_argument("--eval-every", type=int, help=f"steps between evaluations on the held-out "
                   f"10%%, 0 for none (default: {_default('training', 'eval_every')})")
    g.add_argument("--eval-batches", type=int, help=f"batches per evaluation (default: "
                   f"{_default('training', 'eval_batches')})")
    g.add_argument("--save-every", type=int, help=f"steps between saves of model_last, 0 for "
                   f"the end only (default: {_default('training', 'save_every')})")
    g.add_argument("--checkpoint-dir", metavar="FOLDER", help=f"where checkpoints go (default: "
                   f"{_default('training', 'checkpoint_dir')}; on --resume the run's folder)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that holds another run's checkpoints, "
                        "deleting them (default: refused)")
    g.add_argument("--seed", type=int, help=f"random seed of the weights and batches (default: "
                   f"{_default('training', 'seed')})")
    g.add_argument("--threads", type=int, help="threads to use (default: all cores)")
    g.add_argument("--precision", choices=("float32", "bf16"),
                   help="the linear layers' matrix products in float32, or in bf16 with float32 "
                        "sums and master weights (mixed precision, fast on CPUs with Intel AMX) "
                        "(default: float32; on --resume the run's)")
    g.add_argument("--log-every", type=int, help=f"steps between progress lines (default: "
                   f"{_default('training', 'log_every')})")
    g = p.add_argument_group("continuing a run")
    g.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue the run of this checkpoint, or of the newest checkpoint in "
                        "this folder: its text, folder and options unless flags are given")
    g.add_argument("--new-data", action="store_true",
                   help="allow --resume on text other than the run's (fine-tuning; default: "
                        "refused, so a run is never continued on the wrong text by mistake)")

    for name, helptext, description in (
            ("generate", "continue a prompt from a checkpoint (streamed)",
             "Continue --prompt with a trained model, streamed to the terminal."),
            ("chat", "an interactive loop: each line you type is continued",
             "Each line you type is continued by the model (it completes text; it was not "
             "trained to answer). /help lists the commands.")):
        p = parsers[name] = _sub(sub, name, helptext, description)
        p.add_argument("model", metavar="MODEL", help=_MODEL_ARG)
        p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
        if name == "generate":
            p.add_argument("--prompt", default="The ", help="text to continue (default: 'The ')")
        _sampling_flags(p)
        p.add_argument("--threads", type=int, help="threads to use (default: all cores)")

    p = parsers["serve"] = _sub(sub, "serve", "an HTTP server for a checkpoint (needs "
                                "smallmind[serve])", "An HTTP server for a trained model "
                                "(docs/server.md lists the endpoints).")
    p.add_argument("model", metavar="MODEL", help=_MODEL_ARG)
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    p.add_argument("--host", help=f"address to listen on (default: {_default('server', 'host')}; "
                   f"0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help=f"port (default: {_default('server', 'port')})")
    p.add_argument("--max-concurrency", type=int, help=f"generations decoded together by the "
                   f"batch engine (default: {_default('server', 'max_concurrency')})")
    p.add_argument("--queue-size", type=int, help=f"requests waiting beyond those, then HTTP "
                   f"429 (default: {_default('server', 'queue_size')})")
    p.add_argument("--timeout", type=float, help=f"seconds a request may take (default: "
                   f"{_default('server', 'timeout')})")
    _dtype_flag(p)
    p.add_argument("--threads-per-request", type=int, help="threads of each batch engine step "
                   "(default: all cores)")
    p.add_argument("--max-body-bytes", type=int, help=f"largest request body in bytes, then HTTP "
                   f"413 (default: {_default('server', 'max_body_bytes')})")
    p.add_argument("--max-prompt-chars", type=int, help=f"longest prompt in characters, then HTTP "
                   f"400 (default: {_default('server', 'max_prompt_chars')})")
    p.add_argument("--header-timeout", type=float, help=f"seconds a client has to send a request's "
                   f"headers, then the connection is closed (default: "
                   f"{_default('server', 'header_timeout')})")
    p.add_argument("--body-timeout", type=float, help=f"seconds a client has to send a request's "
                   f"body, then HTTP 408 (default: {_default('server', 'body_timeout')})")
    p.add_argument("--max-connections", type=int, help=f"open connections at once, then HTTP 503 "
                   f"(default: {_default('server', 'max_connections')})")
    p.add_argument("--shutdown-timeout", type=float, help=f"seconds SIGTERM or Ctrl-C waits for "
                   f"running requests (default: {_default('server', 'shutdown_timeout')})")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="a key /v1 requests must send as 'Authorization: Bearer KEY'; repeat for "
                        "several (default: none, or SMALLMIND_SERVER_API_KEY, comma-separated)")
    p.add_argument("--api-key-file", metavar="FILE", help="a file of keys, one per line "
                   "(default: none)")
    p.add_argument("--metrics-auth", action="store_true", default=None,
                   help="/metrics needs a key too (default: open)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients use and responses "
                   "carry (default: the checkpoint's name)")
    p.add_argument("--max-n", type=int, help=f"most choices per request, n times the prompts "
                   f"(default: {_default('server', 'max_n')})")
    p.add_argument("--prefill-budget", type=int, help=f"prompt tokens prefilled per engine step "
                   f"while others decode (default: {_default('server', 'prefill_budget')})")
    p.add_argument("--prefix-cache", type=int, help=f"prompt beginnings (multiples of 64 tokens) "
                   f"kept so that prompts sharing one skip its prefill; 0 turns it off (default: "
                   f"{_default('server', 'prefix_cache')})")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (default: the "
                   "model folder's chat_template.jinja, else smallmind's own)")

    p = parsers["quantize"] = _sub(sub, "quantize", "write a checkpoint's model with int8 or "
                                   "bf16 weights", "Write MODEL's weight matrices as int8 (with "
                                   "float32 scales) or bf16 into one safetensors file OUT, with "
                                   "its tokenizer; generate, chat and serve load it as it is. "
                                   "LayerNorms, biases and the position embedding stay float32. "
                                   "The file is written atomically.")
    p.add_argument("model", metavar="MODEL", help=_MODEL_ARG)
    p.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=("int8", "bf16"), default="int8",
                   help="the weight matrices' format (default: int8)")
    p.add_argument("--group", type=int, help="int8 only: one scale per output for every N rows "
                   "of the input axis (N must divide the model's width; default: one scale per "
                   "output over the whole axis)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: "
                   "refused)")

    p = parsers["info"] = _sub(sub, "info", "version, build facts, SIMD level, threads",
                               "The version, compiler, OpenMP, SIMD level and thread count.")
    p.add_argument("--config", nargs="?", const=True, metavar="FILE",
                   help="print the effective configuration instead (defaults < FILE < "
                        "environment)")
    parsers["bench"] = _sub(sub, "bench", "a quick matmul table and a generation table",
                            "Two quick tables: smallmind's matmul against numpy's "
                            "(GFLOP/s on four shapes), then greedy generation with untrained "
                            "weights (time to first token, tokens/s) for two model sizes.")
    for parser in parsers.values():           # "--steps N" reads better than "--steps STEPS"
        for action in parser._actions:
            if action.metavar is None and action.type in (int, float):
                action.metavar = "N" if action.type is int else "X"
    return ap, parsers


def _sampling_flags(p):
    p.add_argument("--max-tokens", type=int, help=f"tokens to generate (default: "
                   f"{_default('inference', 'max_tokens')})")
    p.add_argument("--temperature", type=float, help=f"randomness, 0 for the most likely token "
                   f"(default: {_default('inference', 'temperature')})")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, 0 for all "
                   f"(default: {_default('inference', 'top_k')})")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens that make "
                   f"up this probability (default: {_default('inference', 'top_p')})")
    p.add_argument("--seed", type=int, help="makes the sampling reproducible (default: none)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable; default: none)")
    p.add_argument("--window", choices=("shift", "slide"),
                   help="past the context length: keep the newer half and refill (shift), or "
                        f"move by one token (slide) (default: {_default('inference', 'window')})")
    _dtype_flag(p)


def _dtype_flag(p):
    p.add_argument("--dtype", choices=("float32", "bf16", "int8"),
                   help="the weight matrices' format for generation: bf16 or int8 quantize a "
                        "float32 model when it loads (fewer bytes per token, faster decoding); "
                        "a model saved by `smallmind quantize` is used as saved (default: "
                        f"{_default('inference', 'dtype')})")


_GLOBAL_FLAGS = {"--log-json": 0, "--log-level": 1}     # flag -> values it takes


def with_command(argv, commands):
    """argv with the command made explicit: `smallmind [--log-...] --steps 7` runs the demo with
    its options; an option put before a command (`smallmind --steps 7 train f`) is an error
    saying where it goes, never silently dropped."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in commands or a in ("-h", "--help", "--version"):
            return argv
        flag = a.split("=", 1)[0]
        if flag in _GLOBAL_FLAGS:
            i += 1 + (_GLOBAL_FLAGS[flag] if "=" not in a else 0)
            continue
        if not a.startswith("-"):
            if os.path.exists(a):
                raise UserError(f"{a!r} is not a command; to train on it: smallmind train {a}")
            return argv                   # argparse names the bad command and the choices
        later = next((x for x in argv[i + 1:] if x in commands), None)
        if later is not None:
            raise UserError(f"{a} goes after the command: smallmind {later} ... {a}")
        return argv[:i] + ["demo"] + argv[i:]
    return argv + ["demo"]


def unrecognised(parser, extra):
    """The error for arguments a command does not take, with the nearest option it does."""
    options = [s for action in parser._actions for s in action.option_strings]
    first = extra[0].split("=", 1)[0]
    near = difflib.get_close_matches(first, options, n=1) if first.startswith("-") else []
    parser.error(f"unrecognized arguments: {' '.join(extra)}"
                 + (f" (did you mean {near[0]}?)" if near else ""))
