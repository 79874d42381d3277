"""`POST /tokenize` and `POST /detokenize` (vLLM's routes): a model's tokenizer without generating, for clients that
count tokens before they send (context budgeting) or read ids back as text. The model need not be loaded: the API
process holds every configured model's tokenizer.

    /tokenize    {"model", "prompt"} or {"model", "messages", chat template switches} -> {"count", "max_model_len",
                 "tokens"}
    /detokenize  {"model", "tokens"} -> {"prompt"}
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from llmhost.engine.tokenizer import Tokenizer, check_prompt_switches
from llmhost.errors import RequestError
from llmhost.server.errors import from_request_error, model_not_found
from llmhost.server.openai_schema import ChatMessage, Int, Lenient, check_text
from llmhost.server.state import ServerState


class TokenizeRequest(Lenient):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # a plain prompt: the model's BOS where it wants one
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("send either 'prompt' (text) or 'messages' (a chat), not both or neither", "prompt")
        for i, message in enumerate(self.messages or []):
            message.check(f"messages[{i}]")
        check_text(self.prompt, "prompt")
        check_text(self.chat_template_kwargs, "chat_template_kwargs")
        check_prompt_switches(self.add_generation_prompt, self.continue_final_message)
        return self

    def ids(self, tok: Tokenizer) -> list[int]:
        if self.messages is None:
            return tok.encode(self.prompt or "", add_special_tokens=self.add_special_tokens)
        return tok.encode_chat(
            [m.template_dict() for m in self.messages],
            self.add_generation_prompt,
            self.continue_final_message,
            self.chat_template_kwargs,
        )


class DetokenizeRequest(Lenient):
    model: str
    tokens: list[Int] = Field(min_length=0)


def _tokenizer(state: ServerState, model: str) -> Tokenizer:
    tok = state.tokenizers.get(model)
    if tok is None:
        raise model_not_found(model, state.model_names)
    return tok


def router(state: ServerState, require_key: Callable[..., Awaitable[None]]) -> APIRouter:
    r = APIRouter(dependencies=[Depends(require_key)])

    @r.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        tok = _tokenizer(state, req.model)
        try:
            # Off the event loop, as generation requests tokenize: a long text takes a while.
            ids = await asyncio.to_thread(req.ids, tok)
        except RequestError as e:
            raise from_request_error(e) from None
        max_len = state.client.config.model(req.model).max_seq_len
        return JSONResponse({"count": len(ids), "max_model_len": max_len, "tokens": ids})

    @r.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        tok = _tokenizer(state, req.model)
        bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            # The tokenizer would decode it to nothing, silently.
            e = RequestError(f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})", "tokens")
            raise from_request_error(e)
        return JSONResponse({"prompt": tok.decode(req.tokens)})

    return r
