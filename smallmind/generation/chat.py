"""chat.py - chat templates: how a list of messages (system / user / assistant) becomes the one
prompt a language model continues. Models trained here get smallmind's default template (plain
"Role: text" lines, which a character tokenizer can encode); a model folder may carry its own
Jinja template (chat_template.jinja, or the "chat_template" of a Hugging Face
tokenizer_config.json), rendered in jinja2's immutable sandbox, so a template from an untrusted
folder can read the messages and nothing else.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from ..errors import ValidationError

__all__ = ["ChatTemplate", "DEFAULT_TEMPLATE", "ROLES", "find_template"]

ROLES = ("system", "developer", "user", "assistant")

# The default: one "Role: text" block per message, then "Assistant:" for the model to continue.
# A reply ends where the model starts the next user turn (the default stop strings).
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'}"
    "[m.role] }}: {{ m.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
DEFAULT_STOP = ("\nUser:", "\nSystem:")


class ChatTemplate:
    """A Jinja chat template, compiled once in a sandbox. render(messages) gives the prompt;
    `stop` are stop strings every chat reply gets (the default template's turn markers)."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, *, stop: Sequence[str] = (),
                 origin: str = "smallmind's default"):
        try:
            from jinja2 import StrictUndefined, TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:                          # pragma: no cover - a serve extra
            raise ValidationError('chat templates need jinja2: pip install "smallmind[serve]"') from None
        if not isinstance(source, str) or not source:
            raise ValidationError("a chat template must be a non-empty string")
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ValidationError(f"the chat template ({origin}) does not compile: {e}") from None
        self._error = TemplateError
        self.source, self.origin, self.stop = source, origin, tuple(stop)

    @classmethod
    def default(cls) -> "ChatTemplate":
        return cls(DEFAULT_TEMPLATE, stop=DEFAULT_STOP)

    def render(self, messages: list) -> str:
        """The prompt for `messages` (dicts with "role" and a str "content"), ending with the
        generation prompt. ValidationError when the template fails on them."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token="", eos_token="")
        except self._error as e:
            raise ValidationError(f"messages: the chat template ({self.origin}) failed: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise ValidationError(f"messages: the chat template ({self.origin}) failed: {e}") from None


def find_template(path: str | None, model_path: str | None) -> ChatTemplate:
    """The template `serve` uses: the file `path` when given; else, next to the model
    (model_path: a checkpoint file or its folder), chat_template.jinja or the chat_template
    of tokenizer_config.json; else smallmind's default."""
    if path is not None:
        return ChatTemplate(_read(path), origin=path)
    if model_path:
        folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            return ChatTemplate(_read(jinja), origin=jinja)
        cfg = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    source = json.load(f).get("chat_template")
            except (OSError, ValueError, AttributeError) as e:
                raise ValidationError(f"cannot read the chat template of {cfg}: {e}") from None
            if isinstance(source, str) and source:
                return ChatTemplate(source, origin=cfg)
    return ChatTemplate.default()


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"chat_template: cannot read {path}: {e}") from None
