"""config.py - the options of the `smallmind` command and server, validated, with documented
defaults, loadable from a TOML file and SMALLMIND_* environment variables. TrainingOptions is
also what Training.train() validates its arguments with: one definition of every training
option and its rule.

Precedence, highest first: command-line flags > environment > config file > defaults.

    # smallmind.toml
    [model]
    preset = "tiny"
    [training]
    steps = 2000
    learning_rate = 1e-3
    [inference]
    temperature = 0.7
    [server]
    port = 8000

Environment variables name a section and a field: SMALLMIND_TRAINING_STEPS=2000,
SMALLMIND_SERVER_PORT=9000, SMALLMIND_INFERENCE_STOP="\\n" (values are parsed as the field's
type; a list field takes a comma-separated value). `smallmind info --config [FILE]` prints the
effective configuration.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np

from ._validate import check_int, check_number, check_optional_int
from .errors import ValidationError

__all__ = ["ModelOptions", "TrainingOptions", "InferenceOptions", "ServerOptions", "Settings",
           "load_settings"]

_ENV_PREFIX = "SMALLMIND_"


def _check(cond, name, value, rule):
    """A rule that is not a range (the option dataclasses name plain fields; load_settings
    prefixes the section)."""
    if not cond:
        raise ValidationError(f"{name} must be {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model `smallmind train` builds: a preset (tiny, small, medium, shakespeare-char, gpt2)
    or explicit sizes (the default: 4 layers, 4 heads, 128 wide, a 64-token context), and its
    tokenizer: "char" (one id per character of the text) or "bpe" (a byte-level BPE vocabulary
    of vocab_size ids, learnt from the text first)."""
    preset: str | None = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    tokenizer: str = "char"
    vocab_size: int = 2048

    def __post_init__(self):
        from .model.transformer import PRESETS
        _check(self.preset is None or self.preset in PRESETS, "preset", self.preset,
               f"one of {sorted(PRESETS)}")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            check_int(getattr(self, name), name, 1)
        _check(self.n_embd % self.n_head == 0, "n_embd", self.n_embd,
               f"a multiple of n_head ({self.n_head})")
        check_number(self.dropout, "dropout", 0.0, 0.99)
        _check(self.tokenizer in TOKENIZERS, "tokenizer", self.tokenizer, f"one of {TOKENIZERS}")
        check_int(self.vocab_size, "vocab_size", 257, 2 ** 20)


TOKENIZERS = ("char", "bpe")


# The rule of each numeric training option: (int or float, lowest, highest, lowest excluded).
# Training(...) checks its batch_size and seed with the same rules.
TRAINING_RULES: dict[str, tuple] = {
    "steps": (int, 0, 2 ** 62, False),
    "batch_size": (int, 1, 2 ** 20, False),
    "seed": (int, 0, 2 ** 63 - 1, False),
    "learning_rate": (float, 0.0, 10.0, False),
    "warmup_steps": (int, 0, 2 ** 62, False),
    "min_lr": (float, 0.0, 10.0, False),
    "lr_decay_steps": (int, 0, 2 ** 62, False),
    "weight_decay": (float, 0.0, 10.0, False),
    "beta1": (float, 0.0, 0.999999, False),
    "beta2": (float, 0.0, 0.999999, False),
    "eps": (float, 0.0, 1.0, True),
    "grad_clip": (float, 0.0, 3.0e38, False),
    "grad_accum_steps": (int, 1, 2 ** 20, False),
    "log_every": (int, 0, 2 ** 62, False),
    "eval_every": (int, 0, 2 ** 62, False),
    "eval_batches": (int, 1, 2 ** 20, False),
    "save_every": (int, 0, 2 ** 62, False),
    "threads": (int, 1, 1024, False),
}


def check_training_option(name: str, value: Any) -> Any:
    """value checked against TRAINING_RULES[name] (None passes for the optional ones)."""
    kind, lo, hi, lo_open = TRAINING_RULES[name]
    if value is None and name in ("min_lr", "lr_decay_steps", "threads"):
        return None
    if kind is int:
        return check_int(value, name, lo, hi)
    return check_number(value, name, lo, hi, lo_open=lo_open)


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Every option of a training run, checked on construction (TypeError / ValidationError
    naming the option). Training.train() takes these as keyword arguments and builds one; the
    `smallmind train` command reads them from flags, SMALLMIND_TRAINING_* and [training].

    steps: optimizer steps in all; batch_size, seed: the batch sampler's (Training(...));
    learning_rate: the peak, reached after warmup_steps of linear warm-up, then a cosine down
    to min_lr (default learning_rate / 10) at lr_decay_steps (default steps); AdamW's
    weight_decay (weight matrices only), beta1, beta2, eps; grad_clip (global norm, 0: off);
    grad_accum_steps micro-batches per step; log_every, eval_every (0: never), eval_batches,
    save_every (needs checkpoint_dir); threads (None: the library default).

    The defaults are the library's (Training.train); the command starts from CLI_DEFAULTS.
    """
    steps: int = 1000
    batch_size: int = 16
    seed: int = 42
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    min_lr: float | None = None
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 0
    checkpoint_dir: str | None = None
    threads: int | None = None

    def __post_init__(self):
        for name in TRAINING_RULES:
            object.__setattr__(self, name, check_training_option(name, getattr(self, name)))
        if self.min_lr is not None and self.min_lr > self.learning_rate:
            raise ValidationError(f"min_lr must be in [0.0, learning_rate = {self.learning_rate}], "
                                  f"got {self.min_lr}")
        # The kernels take eps and grad_clip as float32 and refuse 0 there (eps=1e-50 rounds to
        # 0): checked here, or the refusal came mid-step - after the step counter had moved,
        # and naming the kernel's argument (max_norm) instead of this one.
        for name in ("eps", "grad_clip"):
            v = getattr(self, name)
            if v > 0 and np.float32(v) == 0:
                raise ValidationError(f"{name} must be 0 or at least "
                                      f"{np.finfo(np.float32).smallest_subnormal:g} (it is used "
                                      f"as a float32), got {v}")
        if self.checkpoint_dir is not None:
            try:
                path = os.fspath(self.checkpoint_dir)
            except TypeError:
                path = None
            _check(isinstance(path, str) and path != "", "checkpoint_dir", self.checkpoint_dir,
                   "a non-empty path or None")
            object.__setattr__(self, "checkpoint_dir", path)
        if self.save_every and self.checkpoint_dir is None:
            raise ValidationError("save_every needs a checkpoint_dir")

    @property
    def effective_min_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def effective_lr_decay_steps(self) -> int:
        return self.steps if self.lr_decay_steps is None else self.lr_decay_steps

    def train_arguments(self) -> dict:
        """The keyword arguments of Training.train() (all but batch_size and seed, which
        belong to Training(...))."""
        d = dataclasses.asdict(self)
        del d["batch_size"], d["seed"]
        return d


# Where the `smallmind train` command starts (longer runs with checkpoints and evaluation;
# the library's own defaults suit a short call from Python).
CLI_DEFAULTS: dict[str, dict[str, Any]] = {
    "training": {"steps": 1000, "learning_rate": 2e-3, "warmup_steps": 100, "eval_every": 200,
                 "log_every": 20, "checkpoint_dir": "checkpoints"},
}


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """Generation (`generate`, `chat`, the server's defaults): tokens, sampling, window policy,
    and the weights' format (dtype "bf16" / "int8": the model is quantized when loaded)."""
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    window: str = "shift"
    threads: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        check_int(self.max_tokens, "max_tokens", 0)
        check_number(self.temperature, "temperature", 0.0, 100.0)
        check_int(self.top_k, "top_k", 0)
        check_number(self.top_p, "top_p", 0.0, 1.0, lo_open=True)
        check_optional_int(self.seed, "seed", 0)
        # a TOML `stop = 5` must name the field, not fail in tuple() with "int is not iterable"
        _check(isinstance(self.stop, (str, list, tuple)), "stop", self.stop,
               "a string or a list of non-empty strings")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), "stop", self.stop,
               "a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        _check(self.window in ("shift", "slide"), "window", self.window, "'shift' or 'slide'")
        check_optional_int(self.threads, "threads", 1, 1024)
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")


# How the model's weight matrices are held for generation (TransformerModel.quantize).
DTYPES = ("float32", "bf16", "int8")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """`smallmind serve`: address; generations decoded together by the batch engine (rows of
    its KV cache) and requests queued beyond them (then HTTP 429); per-request timeout in
    seconds (then 504); library threads of each engine step (default: all cores); and the
    limits against hostile clients: the largest request body in bytes (then HTTP 413) and
    prompt in characters (then 400), seconds to send the request's headers (then the connection
    is closed) and its body (then 408), open connections at once (then 503), and seconds that a
    SIGTERM / Ctrl-C lets running requests finish before they are cancelled.

    The OpenAI API: api_key (keys a /v1 request must carry as "Authorization: Bearer KEY";
    empty: no key needed; the environment variable takes several, comma-separated),
    api_key_file (one key per line, added to api_key), metrics_auth (/metrics needs a key
    too), max_n (the most choices one request may ask for: n, times the prompts of a list),
    prefill_budget (prompt tokens the engine prefills per step while others decode; longer
    prompts are prefilled in chunks of that size, one per step),
    prefix_cache (prompt beginnings kept so that prompts sharing them skip their prefill; 0:
    none),
    chat_template (a Jinja file building chat prompts; default: the model folder's
    chat_template.jinja, else smallmind's own) and model_name (the id clients use; default:
    the checkpoint's name)."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 16
    queue_size: int = 64
    timeout: float = 60.0
    threads_per_request: int | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_connections: int = 256
    shutdown_timeout: float = 5.0
    api_key: tuple = ()
    api_key_file: str | None = None
    metrics_auth: bool = False
    max_n: int = 8
    prefill_budget: int = 512
    prefix_cache: int = 4
    chat_template: str | None = None
    model_name: str | None = None

    def __post_init__(self):
        _check(isinstance(self.host, str) and self.host, "host", self.host, "a host name")
        check_int(self.port, "port", 0, 65535)
        check_int(self.max_concurrency, "max_concurrency", 1, 1024)
        check_int(self.queue_size, "queue_size", 0)
        check_number(self.timeout, "timeout", 0.0, math.inf, lo_open=True)
        check_optional_int(self.threads_per_request, "threads_per_request", 1, 1024)
        check_int(self.max_body_bytes, "max_body_bytes", 1, 1 << 40)
        check_int(self.max_prompt_chars, "max_prompt_chars", 1, 1 << 40)
        check_number(self.header_timeout, "header_timeout", 0.0, _DAY, lo_open=True)
        check_number(self.body_timeout, "body_timeout", 0.0, _DAY, lo_open=True)
        check_int(self.max_connections, "max_connections", 1, 1 << 20)
        check_number(self.shutdown_timeout, "shutdown_timeout", 0.0, _DAY)
        _check(isinstance(self.api_key, (str, list, tuple)), "api_key", self.api_key,
               "a key or a list of keys")
        keys = (self.api_key,) if isinstance(self.api_key, str) else tuple(self.api_key)
        _check(all(isinstance(k, str) and k and k.isprintable() and k.strip() == k for k in keys),
               "api_key", "...", "non-empty printable strings without surrounding spaces")
        object.__setattr__(self, "api_key", keys)
        for name in ("api_key_file", "chat_template", "model_name"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v), name, v, "a non-empty string")
        _check(isinstance(self.metrics_auth, bool), "metrics_auth", self.metrics_auth,
               "true or false")
        check_int(self.max_n, "max_n", 1, 128)
        check_int(self.prefill_budget, "prefill_budget", 1)
        check_int(self.prefix_cache, "prefix_cache", 0, 1024)

    def api_keys(self) -> tuple:
        """Every accepted key: api_key, then the lines of api_key_file (blank lines and lines
        starting with # skipped). ValidationError when the file cannot be read."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                with open(self.api_key_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ValidationError(f"api_key_file: cannot read {self.api_key_file}: {e}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if len(keys) == len(self.api_key):
                raise ValidationError(f"api_key_file: {self.api_key_file} holds no key")
        return tuple(keys)


_DAY = 86400.0     # the longest timeout a server option takes, in seconds


_SECTIONS = {"model": ModelOptions, "training": TrainingOptions, "inference": InferenceOptions,
             "server": ServerOptions}


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    training: TrainingOptions = dataclasses.field(
        default_factory=lambda: TrainingOptions(**CLI_DEFAULTS["training"]))
    inference: InferenceOptions = dataclasses.field(default_factory=InferenceOptions)
    server: ServerOptions = dataclasses.field(default_factory=ServerOptions)
    sources: tuple = ()          # where values came from, lowest precedence first

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def to_toml(self) -> str:
        """The effective settings as TOML (None values are left out: they mean "automatic")."""
        lines = []
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            for k, v in values.items():
                if name == "server" and k == "api_key" and v:
                    lines.append(f"# api_key: {len(v)} key(s), not shown")
                elif v is not None:
                    lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _field_types(cls) -> dict:
    hints = {f.name: f for f in dataclasses.fields(cls)}
    return hints


def _parse_env(section: str, name: str, raw: str, default: Any):
    """An environment value as the type of the field's default (str when the default is None
    or a str, except for the known optional ints)."""
    where = f"{_ENV_PREFIX}{section.upper()}_{name.upper()}"
    optional_ints = {"threads", "seed", "threads_per_request", "lr_decay_steps"}
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int) or (default is None and name in optional_ints):
            return int(raw)
        if isinstance(default, float) or (default is None and name == "min_lr"):
            return float(raw)
        if section == "server" and name == "api_key":
            # keys are taken as written (no escapes): several are separated by commas
            return tuple(k.strip() for k in raw.split(",") if k.strip())
        if isinstance(default, tuple):
            return tuple(s for s in raw.encode().decode("unicode_escape").split(",") if s)
        return raw
    except ValueError:
        raise ValidationError(f"{where}={raw!r} is not a valid value for {section}.{name}") from None


def load_settings(config_path=None, *, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  base: Mapping[str, Mapping[str, Any]] | None = None,
                  base_name: str = "checkpoint") -> Settings:
    """Settings from defaults, then `base` ({section: {field: value}}: a resumed run's own
    options, named `base_name` in `sources`), then the TOML file `config_path` (if given), then
    SMALLMIND_* variables of `env` (default os.environ), then `overrides` (the command-line
    flags that were given). Unknown sections or fields are errors naming them."""
    values: dict[str, dict] = {name: dict(CLI_DEFAULTS.get(name, {})) for name in _SECTIONS}
    sources = ["defaults"]
    if base:
        for section, table in base.items():
            if section not in _SECTIONS:
                raise ValidationError(f"unknown section {section!r}")
            fields = _field_types(_SECTIONS[section])
            unknown = [k for k in table if k not in fields]
            if unknown:
                raise ValidationError(f"{base_name}: unknown option {section}.{unknown[0]}")
            values[section].update(table)
        sources.append(base_name)
    if config_path is not None:
        try:
            import tomllib  # Python 3.11+
        except ImportError:               # 3.9 / 3.10: the same parser as a package
            import tomli as tomllib  # type: ignore[no-redef]
        # open() takes an int as a file descriptor: 3 would read some other open file
        if isinstance(config_path, bool) or not isinstance(config_path, (str, bytes, os.PathLike)):
            raise TypeError(f"config_path must be a path or None, got {type(config_path).__name__}")
        shown = os.fsdecode(config_path)       # for messages (a bytes path prints as b'...')
        try:
            with open(config_path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ValidationError(f"no such config file: {shown}") from None
        except OSError as e:            # a folder, no permission, ...
            raise ValidationError(f"cannot read config file {shown}: {e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
            # UnicodeDecodeError: not UTF-8; RecursionError: tomllib gives up on deep nesting.
            raise ValidationError(f"{shown} is not valid TOML: {e}") from None
        for section, table in data.items():
            if section not in _SECTIONS:
                raise ValidationError(f"{shown}: unknown section [{section}] (known: "
                                      f"{', '.join(_SECTIONS)})")
            if not isinstance(table, dict):
                raise ValidationError(f"{shown}: [{section}] must be a table")
            fields = _field_types(_SECTIONS[section])
            for k, v in table.items():
                if k not in fields:
                    raise ValidationError(f"{shown}: unknown option {section}.{k}")
                values[section][k] = tuple(v) if isinstance(v, list) else v
        sources.append(shown)
    env = os.environ if env is None else env
    used_env = False
    for key, raw in env.items():
        if not key.startswith(_ENV_PREFIX):
            continue
        rest = key[len(_ENV_PREFIX):].lower()
        found = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if found is None:
            continue
        section = found                  # other SMALLMIND_* variables (SMALLMIND_SIMD, ...)
        name = rest[len(section) + 1:]
        fields = _field_types(_SECTIONS[section])
        if name not in fields:
            raise ValidationError(f"{key}: unknown option {section}.{name}")
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        values[section][name] = _parse_env(section, name, raw, default)
        used_env = True
    if used_env:
        sources.append("environment")
    for section, table in (overrides or {}).items():
        if section not in _SECTIONS:
            raise ValidationError(f"unknown section {section!r}")
        given = {k: v for k, v in table.items() if v is not None}
        if given:
            values[section].update(given)
            if "flags" not in sources:
                sources.append("flags")
    built = {}
    for section, cls in _SECTIONS.items():
        try:
            built[section] = cls(**values[section])
        except (TypeError, ValidationError) as e:
            # the dataclasses name the field; here it is a setting of a section
            raise ValidationError(f"{section}.{e}") from None
    return Settings(**built, sources=tuple(sources))
