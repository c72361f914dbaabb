"""The model's tokenizer and chat template, read straight from tokenizer.json and Jinja.

A thin layer over the `tokenizers` library (the engine of Hugging Face fast tokenizers) so that
loading a model never imports transformers. Chat templates render in a sandboxed Jinja
environment set up the way transformers sets it up, so templates written for it work unchanged.
"""

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

from scalesim.errors import ModelLoadError


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        try:
            self.fast = FastTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise ModelLoadError(f"cannot read {folder / 'tokenizer.json'}: {exc}") from exc
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = folder / "chat_template.jinja"
        self.chat_template: str | None = (template_path.read_text() if template_path.exists()
                                          else config.get("chat_template"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token_id = self.fast.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.fast.token_to_id(self.bos_token) if self.bos_token else None

    def __len__(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.fast.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.fast.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.fast.token_to_id(token)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **extra) -> str:
        """The prompt text for `messages`; jinja2 TemplateError if the template rejects them."""
        if self.chat_template is None:
            raise jinja2.exceptions.TemplateError("this model has no chat template")
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
