"""use.py - the commands that use a trained model: `generate`, `chat` (with its /commands) and
`serve`. A model is named by a checkpoint file or a run's folder (checkpoint.find_checkpoint)."""
import dataclasses
import os
import sys

from .. import __version__
from ._common import UserError, settings_for


def load_model(name, what=None):
    """(model, tokenizer, path) for the model a command names: a Hugging Face GPT-2 folder (it
    has a config.json), a checkpoint file or a run's folder (its best model;
    checkpoint.find_checkpoint is the one rule)."""
    from ..errors import CheckpointError
    from ..model.checkpoint import find_checkpoint, load_checkpoint
    from ..model.pretrained import load_pretrained
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
        path = name
        model, tok = load_pretrained(name)
    else:
        try:
            path = find_checkpoint(name)
        except CheckpointError as e:
            raise UserError(str(e) if what is None else f"{what}: {e}") from None
        model, tok = load_checkpoint(path)
    if tok is None:
        model.close()
        raise UserError(f"{path} holds no tokenizer (a model saved without one cannot turn "
                        f"text into tokens)")
    return model, tok, path



def _as_dtype(model, dtype, path):
    """The model in the weight format asked for (quantized from float32; the float32 copy is
    closed), or as it is. float32 (the default) means as saved."""
    if dtype == "float32" or model.dtype == dtype:
        return model
    try:
        if model.dtype != "float32":
            raise UserError(f"{path} holds {model.dtype} weights already: --dtype {dtype} would "
                            f"quantize them a second time (quantize the float32 model instead)")
        return model.quantize(dtype)
    finally:
        model.close()


def cmd_quantize(args):
    """Write MODEL quantized to OUT (atomically), with its tokenizer."""
    from ..errors import ValidationError
    out = args.out
    if os.path.isdir(out):
        raise UserError(f"OUT {out} is a folder; give the .safetensors file to write")
    if os.path.exists(out) and not args.overwrite:
        raise UserError(f"OUT {out} exists; pass --overwrite to replace it")
    if args.group is not None and args.dtype != "int8":
        raise UserError("--group goes with --dtype int8 (bf16 has no scales)")
    model, tok, path = load_model(args.model)
    try:
        if model.dtype != "float32":
            raise UserError(f"{path} holds {model.dtype} weights already; quantize the float32 "
                            f"model it was made from")
        try:
            q = model.quantize(args.dtype, group=args.group)
        except ValidationError as e:
            raise UserError(f"--group: {e}" if args.group is not None else str(e)) from None
    finally:
        model.close()
    try:
        before = model.config.num_parameters() * 4
        if os.path.exists(out) and not args.overwrite:     # again: it may have appeared meanwhile
            raise UserError(f"OUT {out} exists; pass --overwrite to replace it")
        q.save(out, tok)
        print(f"smallmind: wrote {out}: {q} ({os.path.getsize(out) / 1e6:.1f} MB on disk; "
              f"float32 weights {before / 1e6:.1f} MB)")
    finally:
        q.close()
    return 0


def _sampling(args):
    """(Sampling, its generate options, InferenceOptions, path) for generate / chat."""
    from ..generation.sampling import Sampling
    inf = settings_for(args).inference
    model, tok, path = load_model(args.model)
    model = _as_dtype(model, inf.dtype, path)
    return Sampling(model, tok, threads=inf.threads, window=inf.window), _sample_kwargs(inf), inf, path


def _sample_kwargs(inf):
    return dict(max_new_tokens=inf.max_tokens, temperature=inf.temperature, top_k=inf.top_k,
                top_p=inf.top_p, seed=inf.seed, stop=list(inf.stop) or None)


def cmd_generate(args):
    sampler, kwargs, _, path = _sampling(args)
    if path != args.model:
        print(f"smallmind: generating from {path}", file=sys.stderr)
    try:
        sys.stdout.write(args.prompt)
        for piece in sampler.stream(args.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        sampler.model.close()
    return 0


def _access_log():
    """One line per request on stderr. With --log-level / --log-json the library's handler
    (configure_logging) prints them; otherwise they get a plain handler of their own."""
    import logging
    access = logging.getLogger("smallmind.server.access")
    access.setLevel(logging.INFO)
    root = logging.getLogger("smallmind")
    if not any(type(h).__name__ != "_WarningLines" for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access.addHandler(h)
        access.propagate = False


def cmd_serve(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from ..generation.server import serve
    except ImportError:
        raise UserError('serve needs FastAPI and uvicorn: pip install "smallmind[serve]" (from a '
                        'checkout: pip install ".[serve]")') from None
    st = settings_for(args)
    keys = st.server.api_keys()                 # a missing key file fails before the model loads
    model, tok, path = load_model(args.model)
    model = _as_dtype(model, st.inference.dtype, path)
    name = os.path.basename(os.path.normpath(args.model))
    name = st.server.model_name or (os.path.splitext(name)[0] if os.path.isfile(args.model) else name)
    print(f"smallmind {__version__}: serving {path} ({model}) as {name!r} on "
          f"http://{st.server.host}:{st.server.port} (OpenAI API under /v1, "
          f"{'API key required' if keys else 'no API key'}; {st.server.max_concurrency} decoded "
          f"together, {st.server.queue_size} queued); Ctrl-C stops", flush=True)
    _access_log()
    serve(model, tok, st.server, st.inference, model_name=name, model_path=path)
    return 0


_CHAT_HELP = """commands:
  /help               this list
  /set NAME VALUE     change a setting: temperature, top_k, top_p, max_tokens, seed
  /settings           show the settings
  /quit               leave (also /exit, or Ctrl-D)
anything else is a prompt: the model continues it. Ctrl-C stops a reply."""


def cmd_chat(args):
    """Read a line, continue it, repeat, until /quit or end of input."""
    sampler, kwargs, inf, path = _sampling(args)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    try:
        if interactive:
            out.write(f"smallmind chat with {path} ({sampler.model.num_parameters():,} "
                      f"parameters): each line you type is continued, up to {inf.max_tokens} "
                      f"tokens.\n/help lists commands; /quit or Ctrl-D leaves.\n")
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:                                   # end of input
                if interactive:
                    out.write("\nbye\n")
                return 0
            prompt = line.rstrip("\r\n")
            command = prompt.strip()
            if command in ("/quit", "/exit"):
                if interactive:
                    out.write("bye\n")
                return 0
            if not command:
                continue                                   # nothing to continue
            if command.startswith("/"):
                inf, kwargs = _chat_command(command, inf, kwargs, out)
                continue
            if not interactive:
                out.write(f"> {prompt}\n")                 # the transcript shows what was asked
            try:
                for piece in sampler.stream(prompt, **kwargs):
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                out.write(" [stopped]")
            out.write("\n")
            out.flush()
    finally:
        sampler.model.close()


def _chat_command(command, inf, kwargs, out):
    """A /command of the chat loop: (new InferenceOptions, new generate options)."""
    from ..errors import ValidationError
    words = command.split()
    if words[0] == "/help":
        out.write(_CHAT_HELP + "\n")
    elif words[0] == "/settings":
        out.write(", ".join(f"{k} {getattr(inf, k)}" for k in
                            ("temperature", "top_k", "top_p", "max_tokens", "seed")) + "\n")
    elif words[0] == "/set" and len(words) == 3 and words[1] in ("temperature", "top_k", "top_p",
                                                                  "max_tokens", "seed"):
        name, raw = words[1], words[2]
        try:
            value = float(raw) if name in ("temperature", "top_p") else int(raw)
            inf = dataclasses.replace(inf, **{name: value})
        except (ValueError, ValidationError) as e:
            out.write(f"cannot set {name} to {raw}: {e}\n")
        else:
            kwargs = _sample_kwargs(inf)
            out.write(f"{name} = {value}\n")
    elif words[0] == "/set":
        out.write("usage: /set NAME VALUE, NAME one of temperature, top_k, top_p, max_tokens, "
                  "seed\n")
    else:
        out.write(f"unknown command {words[0]}; /help lists the commands\n")
    out.flush()
    return inf, kwargs
