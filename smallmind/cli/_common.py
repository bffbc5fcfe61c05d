"""_common.py - what the command's modules share: UserError (a mistake the user can fix: one
line, exit status 2), the settings a command reads, and how paths are shown."""
import os

from ..config import Settings


class UserError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


# The flags of `train` that set [model] and [training] options.
MODEL_FLAGS = ("preset", "n_layer", "n_head", "n_embd", "block_size")
TOKENIZER_FLAGS = ("tokenizer", "vocab_size")
TRAINING_FLAGS = ("steps", "batch_size", "grad_accum_steps", "learning_rate", "warmup_steps",
                  "eval_every", "eval_batches", "save_every", "checkpoint_dir", "seed", "threads",
                  "log_every")


def settings_for(args, base=None) -> Settings:
    """The configuration: defaults < `base` (a resumed run's own options) < --config FILE <
    SMALLMIND_* < the flags given."""
    from ..config import load_settings
    flags = {k: v for k, v in vars(args).items() if v is not None}
    inference = {k: flags.get(k) for k in ("max_tokens", "temperature", "top_k", "top_p",
                                           "seed", "stop", "window", "threads", "dtype")}
    server = {k: flags.get(k) for k in ("host", "port", "max_concurrency", "queue_size", "timeout",
                                        "threads_per_request", "max_body_bytes",
                                        "max_prompt_chars", "header_timeout", "body_timeout",
                                        "max_connections", "shutdown_timeout", "api_key",
                                        "api_key_file", "metrics_auth", "model_name", "max_n",
                                        "prefill_budget", "prefix_cache", "chat_template")}
    if args.command == "train":
        overrides = {"model": {k: flags.get(k) for k in MODEL_FLAGS + TOKENIZER_FLAGS},
                     "training": {k: flags.get(k) for k in TRAINING_FLAGS}}
    elif args.command == "serve":
        overrides = {"server": server, "inference": {"threads": flags.get("threads"),
                                                     "dtype": flags.get("dtype")}}
    else:
        overrides = {"inference": inference}
    return load_settings(getattr(args, "config", None), overrides=overrides, base=base)


def shown(path):
    """A path as a message shows it: relative to the current folder when it is under it."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel
