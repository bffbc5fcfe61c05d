"""config.py - the options of the `smallmind` command and server, validated, with documented
defaults, loadable from a TOML file and SMALLMIND_* environment variables.

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
import os
from typing import Any, Mapping

from .errors import ValidationError

__all__ = ["ModelOptions", "TrainingOptions", "InferenceOptions", "ServerOptions", "Settings",
           "load_settings"]

_ENV_PREFIX = "SMALLMIND_"


def _check(cond, section, name, value, rule):
    if not cond:
        raise ValidationError(f"{section}.{name} must be {rule}, got {value!r}")


def _int_in(section, name, v, lo, hi=None):
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi),
           section, name, v, f"an int >= {lo}" + (f" and <= {hi}" if hi is not None else ""))


def _num_in(section, name, v, lo, hi=None, lo_open=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > lo if lo_open else v >= lo) \
        and (hi is None or v <= hi)
    _check(ok, section, name, v, f"a number {'>' if lo_open else '>='} {lo}"
           + (f" and <= {hi}" if hi is not None else ""))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model `smallmind train` builds: a preset (tiny, small, medium, shakespeare-char, gpt2)
    or explicit sizes (the default: 4 layers, 4 heads, 128 wide, a 64-token context)."""
    preset: str | None = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        from .model.transformer import PRESETS
        _check(self.preset is None or self.preset in PRESETS, "model", "preset", self.preset,
               f"one of {sorted(PRESETS)}")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            _int_in("model", name, getattr(self, name), 1)
        _check(self.n_embd % self.n_head == 0, "model", "n_embd", self.n_embd,
               f"a multiple of n_head ({self.n_head})")
        _num_in("model", "dropout", self.dropout, 0.0, 0.99)


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """`smallmind train`: optimizer steps in all, batch, peak learning rate (linear warm-up,
    cosine decay), evaluation and checkpoint cadence, where checkpoints go."""
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup: int = 100
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 0
    checkpoint_dir: str = "checkpoints"
    seed: int = 42
    threads: int | None = None
    log_every: int = 20

    def __post_init__(self):
        for name, lo in (("steps", 0), ("batch_size", 1), ("warmup", 0), ("eval_every", 0),
                         ("eval_batches", 1), ("save_every", 0), ("seed", 0), ("log_every", 1)):
            _int_in("training", name, getattr(self, name), lo)
        _num_in("training", "learning_rate", self.learning_rate, 0.0, 10.0, lo_open=True)
        _check(isinstance(self.checkpoint_dir, str) and self.checkpoint_dir, "training",
               "checkpoint_dir", self.checkpoint_dir, "a non-empty path")
        if self.threads is not None:
            _int_in("training", "threads", self.threads, 1, 1024)


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """Generation (`generate`, `chat`, the server's defaults): tokens, sampling, window policy."""
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    window: str = "shift"
    threads: int | None = None

    def __post_init__(self):
        _int_in("inference", "max_tokens", self.max_tokens, 0)
        _num_in("inference", "temperature", self.temperature, 0.0, 100.0)
        _int_in("inference", "top_k", self.top_k, 0)
        _num_in("inference", "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.seed is not None:
            _int_in("inference", "seed", self.seed, 0)
        # a TOML `stop = 5` must name the field, not fail in tuple() with "int is not iterable"
        _check(isinstance(self.stop, (str, list, tuple)), "inference", "stop", self.stop,
               "a string or a list of non-empty strings")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), "inference", "stop", self.stop,
               "a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        _check(self.window in ("shift", "slide"), "inference", "window", self.window,
               "'shift' or 'slide'")
        if self.threads is not None:
            _int_in("inference", "threads", self.threads, 1, 1024)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """`smallmind serve`: address, concurrent generations, queued requests beyond them (then HTTP
    429), per-request timeout in seconds, library threads per request (default: cores divided
    by max_concurrency)."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 4
    queue_size: int = 16
    timeout: float = 60.0
    threads_per_request: int | None = None

    def __post_init__(self):
        _check(isinstance(self.host, str) and self.host, "server", "host", self.host, "a host name")
        _int_in("server", "port", self.port, 0, 65535)
        _int_in("server", "max_concurrency", self.max_concurrency, 1, 1024)
        _int_in("server", "queue_size", self.queue_size, 0)
        _num_in("server", "timeout", self.timeout, 0.0, lo_open=True)
        if self.threads_per_request is not None:
            _int_in("server", "threads_per_request", self.threads_per_request, 1, 1024)


_SECTIONS = {"model": ModelOptions, "training": TrainingOptions, "inference": InferenceOptions,
             "server": ServerOptions}


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    training: TrainingOptions = dataclasses.field(default_factory=TrainingOptions)
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
                if v is not None:
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
    optional_ints = {"threads", "seed", "threads_per_request"}
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int) or (default is None and name in optional_ints):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(s for s in raw.encode().decode("unicode_escape").split(",") if s)
        return raw
    except ValueError:
        raise ValidationError(f"{where}={raw!r} is not a valid value for {section}.{name}") from None


def load_settings(config_path=None, *, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Settings from defaults, then the TOML file `config_path` (if given), then SMALLMIND_*
    variables of `env` (default os.environ), then `overrides` ({section: {field: value}}, the
    command-line flags that were given). Unknown sections or fields are errors naming them."""
    values: dict[str, dict] = {name: {} for name in _SECTIONS}
    sources = ["defaults"]
    if config_path is not None:
        import tomllib
        # open() takes an int as a file descriptor: 3 would read some other open file
        if isinstance(config_path, bool) or not isinstance(config_path, (str, bytes, os.PathLike)):
            raise TypeError(f"config_path must be a path or None, got {type(config_path).__name__}")
        try:
            with open(config_path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ValidationError(f"no such config file: {config_path}") from None
        except OSError as e:            # a folder, no permission, ...
            raise ValidationError(f"cannot read config file {config_path}: {e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
            # UnicodeDecodeError: not UTF-8; RecursionError: tomllib gives up on deep nesting.
            raise ValidationError(f"{config_path} is not valid TOML: {e}") from None
        for section, table in data.items():
            if section not in _SECTIONS:
                raise ValidationError(f"{config_path}: unknown section [{section}] (known: "
                                      f"{', '.join(_SECTIONS)})")
            if not isinstance(table, dict):
                raise ValidationError(f"{config_path}: [{section}] must be a table")
            fields = _field_types(_SECTIONS[section])
            for k, v in table.items():
                if k not in fields:
                    raise ValidationError(f"{config_path}: unknown option {section}.{k}")
                values[section][k] = tuple(v) if isinstance(v, list) else v
        sources.append(str(config_path))
    env = os.environ if env is None else env
    used_env = False
    for key, raw in env.items():
        if not key.startswith(_ENV_PREFIX):
            continue
        rest = key[len(_ENV_PREFIX):].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue                  # other SMALLMIND_* variables (SMALLMIND_SIMD, ...)
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
        except TypeError as e:
            raise ValidationError(f"[{section}]: {e}") from None
    return Settings(**built, sources=tuple(sources))
