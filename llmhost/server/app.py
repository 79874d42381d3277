"""The FastAPI app: OpenAI routes (/v1/models, /v1/chat/completions, /v1/completions), /health, /metrics and the
admin routes, in front of a started HostClient.

Prompts are tokenized here (chat: the model's template, then encoded without adding special tokens, since the
template writes them) and text is detokenized here, so the host process sees token ids only.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import RequestError
from llmhost.host.client import HostClient, HostRequestError, HostUnavailableError
from llmhost.server import admin, dashboard, errors, tokens
from llmhost.server.body_limit import BodyLimit, body_limit
from llmhost.server.errors import ApiError, from_request_error
from llmhost.server.generation import Lease, ModelGate, Piece, choice_jobs, merge, run_choice
from llmhost.server.metrics import Metrics
from llmhost.server.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from llmhost.server.responses import DONE, Builder, ChatBuilder, CompletionBuilder
from llmhost.server.state import ServerState

QUEUE_PER_BATCH = 4  # sequences allowed in flight per model, as a multiple of its max_batch
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
HostError = (HostRequestError, HostUnavailableError)


def create_app(
    client: HostClient,
    tokenizers: Mapping[str, Tokenizer],
    api_key: str | None = None,
    queue_per_batch: int = QUEUE_PER_BATCH,
) -> FastAPI:
    """client: started (or starting); tokenizers: one per configured model, by name."""
    limits = {m.name: queue_per_batch * m.max_batch for m in client.config.models}
    state = ServerState(
        client=client,
        tokenizers=tokenizers,
        metrics=Metrics(list(limits), client.inventory),
        gate=ModelGate(limits),
        api_key=api_key,
        created=int(time.time()),
    )
    app = FastAPI(title="llmhost", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.llmhost = state
    errors.install(app)
    app.add_middleware(BodyLimit, limit=body_limit(m.max_seq_len for m in client.config.models))

    async def require_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if state.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(
                401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models")
    async def list_models() -> Response:
        return _json(ModelList(data=[_card(state, name) for name in state.model_names]).model_dump_json())

    # `:path`: HF-style model names hold a slash ("org/model").
    @v1.get("/models/{name:path}")
    async def get_model(name: str) -> Response:
        if name not in state.tokenizers:
            raise errors.model_not_found(name, state.model_names)
        return _json(_card(state, name).model_dump_json())

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        state.note_unknown_fields(req.unknown_fields())
        state.check_model(req.model)
        params = _checked_params(state, req, 1)
        tok = state.tokenizers[req.model]
        try:
            # Off the event loop (Tokenizer.encode lets go of the GIL): a 4 MiB prompt takes seconds to tokenize.
            ids = await asyncio.to_thread(
                tok.encode_chat,
                [m.template_dict() for m in req.messages],
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
            )
        except RequestError as e:
            raise from_request_error(e) from None
        builder = ChatBuilder(req.model, tok, req.n, len(ids), req.num_logprobs, req.include_usage)
        return await _generate(state, req, params, [ids], builder, arrival, request, "messages")

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        state.note_unknown_fields(req.unknown_fields())
        state.check_model(req.model)
        params = _checked_params(state, req, req.prompt_count)
        tok = state.tokenizers[req.model]
        prompts = await asyncio.to_thread(_completion_prompts, req.prompt, tok)
        echo = await asyncio.to_thread(_echoed, req.prompt, prompts, tok) if req.echo else None
        builder = CompletionBuilder(
            req.model, tok, req.n * len(prompts), sum(map(len, prompts)), req.num_logprobs, req.include_usage, echo
        )
        return await _generate(state, req, params, prompts, builder, arrival, request, "prompt")

    app.include_router(v1)
    app.include_router(admin.router(state, require_key))
    app.include_router(dashboard.router())
    app.include_router(tokens.router(state, require_key))

    @app.get("/health")
    async def health() -> JSONResponse:
        models = {name: st.state for name, st in state.client.status.items()}
        if state.stopping:
            status = "stopping"
        elif not state.client.alive:
            status = "host_down"
        else:
            status = "ok"
        return JSONResponse({"status": status, "models": models}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.update((await state.fresh_status()).values())
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _json(text: str) -> Response:
    return Response(text, media_type="application/json")


def _card(state: ServerState, name: str) -> ModelCard:
    st = state.client.status.get(name)
    return ModelCard(
        id=name,
        created=state.created,
        state=st.state if st else "loading",
        device=st.device if st else "",
        max_seq_len=state.client.config.model(name).max_seq_len,
        memory=dict(st.memory) if st else {},
    )


def _echoed(
    prompt: str | list[str] | list[int] | list[list[int]], prompts: list[list[int]], tok: Tokenizer
) -> list[tuple[str, list[int]]]:
    """Each prompt's text as echoed (a text prompt as sent, token ids decoded) and its token ids."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt[0], str):
        texts = [p for p in prompt if isinstance(p, str)]
    else:
        texts = [tok.decode(ids) for ids in prompts]
    return list(zip(texts, prompts, strict=True))


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]], tok: Tokenizer) -> list[list[int]]:
    """OpenAI's four prompt forms -> token-id lists. Text gets the model's BOS when it wants one; ids are sent as
    given (CompletionRequest has already checked that a list is not empty and holds only strings, only ints, or only
    non-empty int lists, and that its text is valid Unicode)."""
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    prompts: list[list[int]] = []
    ids: list[int] = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(tok.encode(p))
        elif isinstance(p, int):
            ids.append(p)
        else:
            prompts.append(list(p))
    return [ids] if ids else prompts


def _checked_params(state: ServerState, req: ChatCompletionRequest | CompletionRequest, prompts: int) -> SamplingParams:
    """The request's SamplingParams, and a check that its sequences (n per prompt) can ever be in flight together;
    both before tokenizing, so a bad field costs no tokenizer time."""
    limit = state.gate.limits[req.model]
    if prompts * req.n > limit:
        raise errors.too_many_sequences(req.model, prompts, req.n, limit)
    # No limit asked: up to the context; the engine caps each sequence at max_seq_len - its prompt length.
    return _sampling_params(req, req.token_limit or state.client.config.model(req.model).max_seq_len)


def _sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            seed=req.seed,
            stop=req.stop_strings,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            min_tokens=req.min_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            logprobs=req.num_logprobs,
            prompt_logprobs=req.prompt_logprobs,
            logit_bias=req.bias_pairs,
        ).validate()
    except RequestError as e:
        raise from_request_error(e) from None


async def _generate(
    state: ServerState,
    req: ChatCompletionRequest | CompletionRequest,
    params: SamplingParams,
    prompts: list[list[int]],
    builder: Builder,
    arrival: float,
    request: Request,
    prompt_param: str,
) -> Response:
    model = req.model
    max_seq_len = state.client.config.model(model).max_seq_len
    for ids in prompts:
        if not ids:
            raise ApiError(
                400, "the prompt is empty; send at least one token", param=prompt_param, code="invalid_value"
            )
        if len(ids) >= max_seq_len:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens, but model '{model}' allows max_seq_len = {max_seq_len} tokens "
                f"for prompt and completion together: send at most {max_seq_len - 1} prompt tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        asked = req.token_limit
        if asked is not None and len(ids) + asked > max_seq_len:
            # As OpenAI and vLLM answer: capped silently, a request for 100 tokens got 1 and finish_reason "length".
            field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens and {field} asks for {asked} more: {len(ids) + asked} tokens, over "
                f"model '{model}''s max_seq_len = {max_seq_len}; send {field} <= {max_seq_len - len(ids)} or a "
                f"shorter prompt, or leave {field} out to generate up to the end of the context",
                param=field,
                code="context_length_exceeded",
            )
    lease = state.gate.acquire(model, len(prompts) * req.n)
    for ids in prompts:
        state.metrics.received(model, len(ids))
    jobs = choice_jobs(prompts, params, req.n)
    pieces = merge(
        [run_choice(state.client, state.tokenizers[model], model, job, state.metrics, arrival) for job in jobs]
    )
    try:
        # Wait for the first piece before answering, so a request the host refuses gets its HTTP status.
        first = await anext(pieces)
    except HostError as e:
        lease.release()
        raise state.host_error(e, model) from None
    except BaseException:
        lease.release()
        await pieces.aclose()
        raise
    if req.stream:
        return StreamingResponse(
            _stream(state, builder, first, pieces, lease),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    collect = asyncio.ensure_future(_collect(builder, first, pieces))
    try:
        # A client that hangs up stops its request: a plain handler is not cancelled when that happens.
        while not collect.done():
            await asyncio.wait({collect}, timeout=DISCONNECT_POLL_S)
            if not collect.done() and await request.is_disconnected():
                collect.cancel()
                return Response(status_code=499)
        return _json(collect.result())
    except HostError as e:
        raise state.host_error(e, model) from None
    finally:
        collect.cancel()
        lease.release()


async def _collect(builder: Builder, first: Piece, pieces: AsyncGenerator[Piece, None]) -> str:
    try:
        builder.add(first)
        async for piece in pieces:
            builder.add(piece)
    finally:
        await pieces.aclose()
    return builder.response()


async def _stream(
    state: ServerState, builder: Builder, first: Piece, pieces: AsyncGenerator[Piece, None], lease: Lease
) -> AsyncIterator[str]:
    """SSE events. A failure after the first event (the host stopped, the server is shutting down) ends the stream
    with an error event, which the OpenAI SDKs raise as APIError."""
    try:
        for event in builder.start():
            yield event
        yield builder.chunk(first)
        async for piece in pieces:
            yield builder.chunk(piece)
        for event in builder.end():
            yield event
    except HostError as e:
        yield state.host_error(e, lease.model).sse_event()
        yield DONE
    except ApiError as e:
        yield e.sse_event()
        yield DONE
    finally:
        lease.release()
        await pieces.aclose()
