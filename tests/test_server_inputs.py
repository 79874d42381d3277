"""Bad inputs to the API get typed errors in OpenAI's format, never a 500 or a silent misreading: the app in front of
a fake host client (no host process, no model), with the real SmolLM2 tokenizer so prompts are really tokenized."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from checkpoint_files import smollm2_gguf
from fastapi.testclient import TestClient
from starlette.types import Message

from llmhost.config import Config, HostConfig, ModelConfig
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import RequestError
from llmhost.host.client import HostClient, HostRequestError
from llmhost.host.messages import ModelStatus, RequestFailed, StatusReply, TokenEvent
from llmhost.memory.inventory import cpu_inventory
from llmhost.server.app import QUEUE_PER_BATCH, create_app
from llmhost.server.body_limit import MIN_BODY_BYTES, BodyLimit, body_limit

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
JSON = {"Content-Type": "application/json"}


@dataclass
class Submitted:
    model: str
    prompt_ids: list[int]
    params: SamplingParams


class FakeHost:
    """What create_app uses of a HostClient. Every request gets two tokens then "length"; `refuse` makes the host
    answer every request with that failure instead; `load_error` makes an admin load fail."""

    def __init__(self, models: list[ModelConfig]) -> None:
        self.config = Config(HostConfig(), tuple(models))
        self.inventory = cpu_inventory()
        self.status = {m.name: ModelStatus(m.name, "loaded", "cpu", m.max_seq_len) for m in models}
        self.alive = True
        self.submitted: list[Submitted] = []
        self.refuse: RequestFailed | None = None
        self.load_error = ""
        self.admin_calls: list[tuple[str, str, bool]] = []

    async def generate_batches(
        self, model: str, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[list[TokenEvent], None]:
        self.submitted.append(Submitted(model, list(prompt_ids), params))
        if self.refuse is not None:
            raise HostRequestError(self.refuse)
        yield [TokenEvent("r", 28, None, None, None), TokenEvent("r", 29, None, None, "length")]

    async def query(self) -> StatusReply:
        return StatusReply(1, tuple(self.status.values()))

    async def admin(self, action: Literal["load", "unload"], model: str, force: bool = False) -> StatusReply:
        self.admin_calls.append((action, model, force))
        st = self.status[model]
        if action == "unload":
            st = replace(st, state="unloaded")
        elif self.load_error:
            st = replace(st, state="failed", error=self.load_error)
        else:
            st = replace(st, state="loaded")
        self.status[model] = st
        return StatusReply(1, tuple(self.status.values()))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf())


def _serve(tokenizer: Tokenizer, *models: ModelConfig) -> tuple[TestClient, FakeHost]:
    models = models or (ModelConfig("m", Path("/unused"), max_seq_len=512, max_batch=4),)
    host = FakeHost(list(models))
    app = create_app(cast(HostClient, host), {m.name: tokenizer for m in models})
    # raise_server_exceptions: an exception that escapes the app (a 500 with a traceback) fails the test.
    return TestClient(app, raise_server_exceptions=True), host


@pytest.fixture
def served(tokenizer: Tokenizer) -> Iterator[tuple[TestClient, FakeHost]]:
    client, host = _serve(tokenizer)
    with client:
        yield client, host


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _raw(client: TestClient, path: str, text: str, headers: dict[str, str] | None = None) -> Any:
    """POST a body as written: JSON with NaN, lone-surrogate escapes or syntax errors that json= cannot send."""
    return client.post(path, content=text.encode(), headers=JSON if headers is None else headers)


# -- 1. lone surrogates ------------------------------------------------------------------------------------------

SURROGATE_CASES = [
    ("/v1/chat/completions", '{"model":"m","messages":[{"role":"user","content":"a\\ud800"}]}', "messages[0].content"),
    (
        "/v1/chat/completions",
        '{"model":"m","messages":[{"role":"system","content":"ok"},'
        '{"role":"user","content":[{"type":"text","text":"ok"},{"type":"text","text":"b\\udc00c"}]}]}',
        "messages[1].content[1]",
    ),
    ("/v1/chat/completions", '{"model":"m","messages":[{"role":"user","content":"x","name":"\\ud83d"}]}', None),
    ("/v1/completions", '{"model":"m","prompt":"a\\ud800"}', "prompt"),
    ("/v1/completions", '{"model":"m","prompt":["fine","a\\ud800"]}', "prompt[1]"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_CASES)
def test_lone_surrogate_is_400_naming_the_field(
    served: tuple[TestClient, FakeHost],
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: str,
    param: str | None,
    stream: bool,
) -> None:
    client, host = served
    if stream:
        body = body[:-1] + ',"stream":true}'
    err = _error(_raw(client, path, body), 400)
    assert err["param"] == (param or "messages[0].name") and err["code"] == "invalid_value"
    assert f"{err['param']} is not valid Unicode text: lone surrogate" in err["message"]
    assert host.submitted == [] and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # a valid surrogate pair is one character (U+1F600), and the server still answers
    ok = _raw(client, "/v1/completions", '{"model":"m","prompt":"smile \\ud83d\\ude00","max_tokens":2}')
    assert ok.status_code == 200, ok.text


def test_unknown_model_name_with_a_lone_surrogate_is_404(served: tuple[TestClient, FakeHost]) -> None:
    client, _ = served
    err = _error(_raw(client, "/v1/completions", '{"model":"m\\ud800","prompt":"a"}'), 404)
    assert err["code"] == "model_not_found"


# -- 2. body size ------------------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    big = json.dumps({"model": "m", "prompt": "x" * MIN_BODY_BYTES}).encode()
    err = _error(client.post("/v1/completions", content=big, headers=JSON), 413)
    assert err["code"] == "request_too_large" and "4.0 MiB" in err["message"] and "split" in err["message"]
    # without Content-Length (chunked), refused as soon as it passes the limit
    chunks = iter([big[i : i + 2**20] for i in range(0, len(big), 2**20)])
    err = _error(client.post("/v1/completions", content=chunks, headers=JSON), 413)
    assert err["code"] == "request_too_large" and host.submitted == []
    # a chunked body under the limit is handed on whole
    small = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 2}).encode()
    r = client.post("/v1/completions", content=iter([small[:10], small[10:]]), headers=JSON)
    assert r.status_code == 200 and len(host.submitted) == 1
    assert client.get("/health").status_code == 200


def test_body_limit_answers_a_declared_length_without_reading_the_body() -> None:
    reads: list[int] = []
    sent: list[Message] = []

    async def receive() -> Message:
        reads.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not be called")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"101")]}
    asyncio.run(BodyLimit(app, limit=100)(scope, receive, send))
    assert reads == [] and sent[0]["status"] == 413


def test_body_limit_grows_with_the_longest_context() -> None:
    assert body_limit([4096, 131072]) == MIN_BODY_BYTES == 4 * 2**20
    assert body_limit([1_048_576]) == 32 * 1_048_576


# -- 3. more sequences than the model ever takes -------------------------------------------------------------------


def test_more_sequences_than_ever_fit_is_400_not_429(tokenizer: Tokenizer) -> None:
    small = ModelConfig("tiny", Path("/unused"), max_seq_len=512, max_batch=1)
    client, host = _serve(tokenizer, ModelConfig("m", Path("/unused"), max_seq_len=512, max_batch=4), small)
    limit = QUEUE_PER_BATCH * 4
    err = _error(client.post("/v1/completions", json={"model": "m", "prompt": list("abcde"), "n": 16}), 400)
    assert err["param"] == "n" and f"at most {limit}" in err["message"] and "n <= 3" in err["message"]
    err = _error(client.post("/v1/chat/completions", json={"model": "tiny", "messages": PARIS, "n": 5}), 400)
    assert err["param"] == "n" and f"at most {QUEUE_PER_BATCH}" in err["message"]
    err = _error(client.post("/v1/completions", json={"model": "m", "prompt": ["a"] * (limit + 1)}), 400)
    assert err["param"] == "prompt" and f"at most {limit} prompts" in err["message"]
    assert host.submitted == []
    # exactly the limit is fine
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["a"] * 4, "n": 4, "max_tokens": 2})
    assert r.status_code == 200 and len(host.submitted) == limit


# -- 4. non-finite and huge sampling values ------------------------------------------------------------------------

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e308", "1e400"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_or_huge_sampling_values_are_400(
    served: tuple[TestClient, FakeHost], field: str, value: str
) -> None:
    client, host = served
    err = _error(_raw(client, "/v1/completions", f'{{"model":"m","prompt":"a","{field}":{value}}}'), 400)
    assert err["param"] == field and err["code"] == "invalid_value" and field in err["message"]
    assert host.submitted == []


def test_sampling_params_validate_refuses_nan_and_out_of_range() -> None:
    for kwargs in ({"repetition_penalty": float("nan")}, {"repetition_penalty": 1e308}, {"top_k": 10**400}):
        with pytest.raises(RequestError) as e:
            SamplingParams(**kwargs).validate()  # type: ignore[arg-type]
        assert e.value.param == next(iter(kwargs))
    SamplingParams(repetition_penalty=0.5, top_k=50).validate()


# -- 5, 6. fields that were silently misread --------------------------------------------------------------------------


def test_top_logprobs_requires_logprobs(served: tuple[TestClient, FakeHost]) -> None:
    client, _ = served
    err = _error(client.post("/v1/chat/completions", json={"model": "m", "messages": PARIS, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs" and "requires logprobs to be true" in err["message"]
    ok = {"model": "m", "messages": PARIS, "top_logprobs": 2, "logprobs": True, "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=ok).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": False}, "max_completion_tokens"),
        ({"n": True}, "n"),
        ({"temperature": True}, "temperature"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "system", "content": None}, *PARIS]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "messages[0].content[0].type",
        ),
    ],
)
def test_misreadable_fields_are_400(served: tuple[TestClient, FakeHost], extra: dict[str, Any], param: str) -> None:
    client, host = served
    err = _error(client.post("/v1/chat/completions", json={"model": "m", "messages": PARIS, **extra}), 400)
    assert err["param"] == param and err["code"] == "invalid_value"
    assert host.submitted == []


def test_fields_that_stay_valid(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    history = [*PARIS, {"role": "assistant", "content": None, "tool_calls": []}, {"role": "user", "content": "And?"}]
    for extra in ({"messages": history}, {"seed": 2**63 - 1}, {"seed": -(2**63)}, {"max_tokens": 3}):
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": PARIS, **extra})
        assert r.status_code == 200, (extra, r.text)
    assert [s.params.seed for s in host.submitted[1:3]] == [2**63 - 1, -(2**63)]


# -- 7. error messages that name the problem ---------------------------------------------------------------------------


def test_malformed_bodies_say_what_is_wrong(served: tuple[TestClient, FakeHost]) -> None:
    client, _ = served
    err = _error(_raw(client, "/v1/completions", '{"model": "m",\n "prompt": "a",}'), 400)
    assert err["message"].startswith("the body is not valid JSON: ") and "line 2, column 16 (char 30)" in err["message"]
    assert err["param"] is None and err["code"] == "invalid_json"
    err = _error(client.post("/v1/chat/completions"), 400)
    assert err["message"].startswith("the request body is empty; send a JSON object with 'model' and 'messages'")
    assert err["code"] == "invalid_json"
    err = _error(_raw(client, "/v1/completions", '{"model":"m","prompt":"a"}', {"Content-Type": "text/plain"}), 400)
    assert "Content-Type 'text/plain', which is not JSON" in err["message"] and err["code"] == "invalid_json"
    err = _error(client.post("/v1/completions", content=b'{"model":"m","prompt":"\xff"}', headers=JSON), 400)
    assert "not valid UTF-8" in err["message"] and "byte 23" in err["message"] and err["code"] == "invalid_json"
    err = _error(_raw(client, "/v1/completions", "[" * 100_000 + "]" * 100_000), 400)
    assert "too deeply" in err["message"] and err["code"] == "invalid_json"
    err = _error(client.post("/v1/completions", json=["m", "a"]), 400)
    assert "an array, not a JSON object" in err["message"]


@pytest.mark.parametrize(("prompt", "needle"), [([], "prompt is an empty list"), ([[]], "prompt[0] is an empty list")])
def test_empty_prompt_lists_have_a_code(served: tuple[TestClient, FakeHost], prompt: list[Any], needle: str) -> None:
    client, _ = served
    err = _error(client.post("/v1/completions", json={"model": "m", "prompt": prompt}), 400)
    assert needle in err["message"] and err["param"] == "prompt" and err["code"] == "invalid_value"


# -- 8, 9. admin and model routes ------------------------------------------------------------------------------------


def test_model_names_with_a_slash_are_reachable(tokenizer: Tokenizer) -> None:
    client, host = _serve(tokenizer, ModelConfig("org/smol", Path("/unused"), max_seq_len=512, max_batch=2))
    r = client.get("/v1/models/org/smol")
    assert r.status_code == 200 and r.json()["id"] == "org/smol"
    r = client.post("/admin/models/org/smol/unload")
    assert r.status_code == 200 and r.json()["state"] == "unloaded" and r.json()["unloading"] is False
    client.post("/admin/models/org/smol/unload?force=true")
    assert host.admin_calls == [("unload", "org/smol", False), ("unload", "org/smol", True)]
    r = client.post("/admin/models/org/smol/load")
    assert r.status_code == 200 and r.json()["name"] == "org/smol" and r.json()["state"] == "loaded"
    assert _error(client.get("/v1/models/org/nope"), 404)["code"] == "model_not_found"
    assert _error(client.post("/admin/models/org/nope/load"), 404)["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={"model": "org/smol", "messages": PARIS, "max_tokens": 2})
    assert r.status_code == 200 and host.submitted[0].model == "org/smol"


def test_admin_load_that_fails_is_an_error(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    host.load_error = "does not fit: needs 3.0 GiB on cuda:0, 1.0 GiB free"
    r = client.post("/admin/models/m/load")
    assert r.status_code == 500
    body = r.json()
    assert body["error"]["code"] == "model_load_failed" and host.load_error in body["error"]["message"]
    assert body["model"]["state"] == "failed" and body["model"]["error"] == host.load_error


# -- 10. one 429 for both queues -------------------------------------------------------------------------------------


def test_queue_full_is_the_same_429_from_the_api_and_the_host(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    state = client.app.state.llmhost  # type: ignore[attr-defined]
    state.gate.in_flight["m"] = state.gate.limits["m"]
    body = {"model": "m", "prompt": "a", "max_tokens": 2}
    api = client.post("/v1/completions", json=body)
    state.gate.in_flight["m"] = 0
    host.refuse = RequestFailed("r", "queue_full", "model 'm' is loading and 16 requests already wait for it")
    from_host = client.post("/v1/completions", json=body)
    for r in (api, from_host):
        err = _error(r, 429)
        assert err["type"] == "rate_limit_exceeded" and err["code"] == "queue_full"
        assert r.headers["Retry-After"] == "1"
    assert state.gate.in_flight["m"] == 0  # the refused request gave its slot back


# -- a completion that cannot fit beside its prompt ------------------------------------------------------------------


def test_max_tokens_past_the_context_is_refused_not_capped(tokenizer: Tokenizer) -> None:
    """As OpenAI and vLLM answer: a prompt of P tokens with max_tokens M past max_seq_len is a 400 naming the
    field and the most it may ask; capped silently, it got fewer tokens than asked and finish_reason "length"."""
    client, host = _serve(tokenizer)
    prompt = [5] * 500  # max_seq_len 512: 12 tokens of room
    err = _error(client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 13}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "max_tokens <= 12" in err["message"]
    chat = {"model": "m", "messages": PARIS, "max_completion_tokens": 600}
    assert _error(client.post("/v1/chat/completions", json=chat), 400)["param"] == "max_completion_tokens"
    assert not host.submitted, "nothing reached the host"
    ok = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 12})
    assert ok.status_code == 200
    no_limit = client.post("/v1/completions", json={"model": "m", "prompt": prompt})
    assert no_limit.status_code == 200 and host.submitted[-1].params.max_tokens == 512, "capped by the engine"


# -- logit_bias ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bias", "says"),
    [
        ({"abc": 1}, "'abc' is not a token id"),
        ({" 12": 1}, "' 12' is not a token id"),
        ({"-3": 1}, "'-3' is not a token id"),
        ({"12": 101}, "must be in [-100, 100]"),
        ({"12": -1e9}, "must be in [-100, 100]"),
        ({"12": 1, "012": 2}, "token id 12 appears twice"),
    ],
)
def test_a_bad_logit_bias_is_400_naming_it(served: tuple[TestClient, FakeHost], bias: Any, says: str) -> None:
    client, host = served
    for path, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": PARIS})):
        err = _error(client.post(path, json={"model": "m", "logit_bias": bias, **body}), 400)
        assert err["param"] == "logit_bias" and says in err["message"], err
    assert not host.submitted


def test_logit_bias_reaches_the_sampler_as_token_id_pairs(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    body = {"model": "m", "prompt": "a", "max_tokens": 2, "logit_bias": {"50": -100, "7": 2.5}}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert host.submitted[-1].params.logit_bias == ((50, -100.0), (7, 2.5))
    # a bias outside the vocabulary is the host's to refuse (it knows the model's); nulls mean no bias
    assert client.post("/v1/completions", json={**body, "logit_bias": None}).status_code == 200
    assert host.submitted[-1].params.logit_bias == ()


def test_stop_token_ids_and_min_tokens_reach_the_host(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    body = {"model": "m", "prompt": "a", "max_tokens": 2, "stop_token_ids": [5, 9]}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert host.submitted[-1].params.stop_token_ids == (5, 9)
    err = _error(client.post("/v1/completions", json={**body, "stop_token_ids": [-1]}), 400)
    assert err["param"] == "stop_token_ids" and "token ids" in err["message"]
    # min_tokens reaches the host; more than max_tokens is a 400 naming it
    assert client.post("/v1/completions", json={**body, "min_tokens": 2}).status_code == 200
    assert host.submitted[-1].params.min_tokens == 2
    err = _error(client.post("/v1/completions", json={**body, "min_tokens": 3}), 400)
    assert err["param"] == "min_tokens" and "max_tokens = 2" in err["message"]


# -- echo --------------------------------------------------------------------------------------------------------


def test_echo_puts_each_prompt_before_its_choices(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    body = {"model": "m", "prompt": ["one", "two"], "n": 2, "max_tokens": 2, "echo": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert [t[:3] for t in texts] == ["one", "one", "two", "two"] and len({t[3:] for t in texts}) == 1
    assert all(s.params.prompt_logprobs is None for s in host.submitted), "no logprobs asked, none computed"
    streamed = client.post("/v1/completions", json={**body, "stream": True})
    firsts: dict[int, str] = {}
    for line in streamed.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                firsts.setdefault(c["index"], c["text"])
    assert sorted(t[:3] for t in firsts.values()) == ["one", "one", "two", "two"]
    # with logprobs the host is asked for the prompt's too; without echo it is not
    client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1, "logprobs": 2})
    assert host.submitted[-1].params.prompt_logprobs is None
    client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1, "logprobs": 2, "echo": True})
    assert host.submitted[-1].params.prompt_logprobs == 2


def test_chat_template_kwargs_are_checked_and_reach_the_template(served: tuple[TestClient, FakeHost]) -> None:
    client, host = served
    chat = {"model": "m", "messages": PARIS, "max_tokens": 2}
    plain = client.post("/v1/chat/completions", json=chat)
    extra = client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"unused_by_chatml": 1}})
    assert plain.status_code == extra.status_code == 200
    assert host.submitted[-1].prompt_ids == host.submitted[-2].prompt_ids  # SmolLM2's template reads no such name
    err = _error(client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"messages": []}}), 400)
    assert err["param"] == "chat_template_kwargs" and "may not set messages" in err["message"]
    bad = '{"model":"m","messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"a":"\\ud800"}}'
    assert _error(_raw(client, "/v1/chat/completions", bad), 400)["param"] == "chat_template_kwargs.a"


# -- /tokenize and /detokenize -------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(served: tuple[TestClient, FakeHost], tokenizer: Tokenizer) -> None:
    client, host = served
    r = client.post("/tokenize", json={"model": "m", "prompt": "The capital of France is"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["tokens"] == tokenizer.encode("The capital of France is") and doc["count"] == len(doc["tokens"])
    assert doc["max_model_len"] == 512
    chat = client.post("/tokenize", json={"model": "m", "messages": PARIS}).json()
    assert chat["tokens"] == tokenizer.encode_chat(PARIS)
    back = client.post("/detokenize", json={"model": "m", "tokens": doc["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "The capital of France is"}
    assert host.submitted == [], "nothing reached the host"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
        ("/tokenize", {"model": "m"}, 400, "prompt"),
        ("/tokenize", {"model": "m", "prompt": "a", "messages": PARIS}, 400, "prompt"),
        ("/tokenize", {"model": "m", "messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
        ("/tokenize", {"model": "m", "messages": PARIS, "continue_final_message": True}, 400, "continue_final_message"),
        ("/detokenize", {"model": "m", "tokens": [1, 10**7]}, 400, "tokens"),
        ("/detokenize", {"model": "m", "tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ],
)
def test_tokenize_errors_name_the_field(
    served: tuple[TestClient, FakeHost], path: str, body: dict[str, Any], status: int, param: str
) -> None:
    client, _ = served
    err = _error(client.post(path, json=body), status)
    assert err["param"] == param, err
