"""ChatTemplate: a model's Jinja chat template, rendered the way transformers renders it (same sandbox, globals,
filters and variables), so a prompt built here is byte for byte the prompt the model was trained on."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmhost.errors import RequestError


class ChatTemplateError(RequestError):
    """A chat request cannot be rendered: the model has no chat template, or its template rejects the messages
    (roles out of order, a role it does not know). Both are answered as a bad request on the `messages` field."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some templates
    (transformers' AssistantTracker). Rendering a prompt needs only the body, but without the tag the template
    would not compile."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it as a plain class attribute)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to refuse a conversation ("Conversation roles must alternate user/assistant/...").
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    # Llama 3.x templates put today's date into the system prompt.
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson escapes HTML characters (<, >, &), which would change tool schemas inside the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """One model's template. `origin` names where it came from (a file and key) for error messages.

    Compiled on first use, not at load: a template that does not compile makes chat requests fail with a clear
    error but must not stop the model from serving plain completions.
    """

    def __init__(self, source: str, origin: str) -> None:
        self.source = source
        self.origin = origin

    @cached_property
    def _template(self) -> jinja2.Template:
        # trim_blocks/lstrip_blocks as in transformers: templates are written for them, and whitespace is part of
        # the prompt.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            return env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"the chat template of {self.origin} does not compile (line {e.lineno}: {e.message}); "
                "fix the template or send a plain completion prompt"
            ) from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        special_tokens: Mapping[str, str],
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """special_tokens: the variables transformers passes besides the messages (bos_token, eos_token, ...);
        only those the tokenizer defines, so a template's `{% if bos_token %}` sees the rest as undefined.
        extra: the request's own variables (vLLM's chat_template_kwargs, e.g. Qwen3's enable_thinking); they may
        not replace the messages, the generation switch or a special token."""
        taken = sorted(set(extra or {}) & {"messages", "add_generation_prompt", *special_tokens})
        if taken:
            raise RequestError(
                f"chat_template_kwargs may not set {', '.join(taken)}: the request's messages and the tokenizer's "
                "special tokens set those",
                "chat_template_kwargs",
            )
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **special_tokens,
                **(extra or {}),
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template of {self.origin} rejected the messages: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            # A message the template did not expect (content missing or not a string) fails inside the template.
            raise ChatTemplateError(
                f"the chat template of {self.origin} cannot render these messages ({type(e).__name__}: {e}); "
                "each message needs a 'role' and a string 'content'"
            ) from None
