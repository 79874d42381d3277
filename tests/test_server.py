"""`llmhost serve` end to end: a real server process (API + host core) on a free localhost port, the real SmolLM2
GGUF on the CPU, driven with the official `openai` SDK. One server per module (a model load costs seconds); the
default-config server is started once more for the Paris answer and the SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from checkpoint_files import smollm2_gguf

from llmhost.cli import main as cli_main
from llmhost.engine.tokenizer import Tokenizer

MODEL = "smol"
KEY = "test-key"
START_TIMEOUT_S = 60.0
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, args: list[str], log: Path, api_key: str | None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        cmd = [sys.executable, "-m", "llmhost.cli", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait_loaded(self, model: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200 and r.json()["models"].get(model) == "loaded":
                    return
            time.sleep(0.2)
        pytest.fail(f"{model} did not load within {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def ps(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/admin/ps", headers=self.headers, timeout=10)
        r.raise_for_status()
        entry: dict[str, Any] = r.json()["models"][0]
        return entry

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "models.toml"
    # max_batch 8: the in-flight limit is 4 x 8 = 32, exactly the concurrent-clients test. float32: on the CPU,
    # bfloat16 matmuls round differently at different batch sizes, and the seed test compares a request sent
    # alone with the same request batched beside another.
    config.write_text(
        f'[models.{MODEL}]\npath = "{smollm2_gguf()}"\ndtype = "float32"\nmax_seq_len = 512\nmax_batch = 8\n'
    )
    srv = Server(["--config", str(config)], tmp / "server.log", KEY)
    try:
        srv.wait_loaded(MODEL)
        yield srv
    finally:
        srv.stop()


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_list_models(server: Server) -> None:
    models = _client(server).models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] == "llmhost"
    assert card["state"] == "loaded" and card["device"] == "cpu" and card["max_seq_len"] == 512
    assert card["memory"]["weights"] > 0 and card["memory"]["kv"] > 0


def test_chat_and_completion(server: Server) -> None:
    c = _client(server)
    chat = c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (chat.choices[0].message.content or "")
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.prompt_tokens > 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    comp = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert comp.choices[0].finish_reason == "length"
    assert comp.usage is not None and comp.usage.completion_tokens == 4
    assert comp.choices[0].text.strip()
    # max_completion_tokens is the newer name; it wins over max_tokens.
    short = c.chat.completions.create(
        model=MODEL,
        messages=PARIS,  # type: ignore[arg-type]
        max_tokens=50,
        max_completion_tokens=2,
        temperature=0,
    )
    assert short.choices[0].finish_reason == "length" and short.usage is not None
    assert short.usage.completion_tokens == 2


def test_streaming_matches_whole_response_and_reports_usage(server: Server) -> None:
    c = _client(server)
    args: dict[str, Any] = dict(model=MODEL, messages=PARIS, max_tokens=16, temperature=0, user="tester")
    whole = c.chat.completions.create(**args)
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # Legacy completions stream too.
    parts = list(c.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert sum(1 for p in parts if p.choices and p.choices[0].finish_reason == "length") == 1


def test_stop_strings(server: Server) -> None:
    c = _client(server)
    full = c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=12, temperature=0).choices[0]  # type: ignore[arg-type]
    text = full.message.content or ""
    assert "Paris" in text
    for stop in ("Paris", ["nothing-like-this", "Paris"]):
        r = c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=12, temperature=0, stop=stop)  # type: ignore[arg-type]
        assert r.choices[0].message.content == text[: text.index("Paris")]
        assert r.choices[0].finish_reason == "stop"
    chunks = list(
        c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=12, temperature=0, stop="Paris", stream=True)  # type: ignore[arg-type]
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text[: text.index("Paris")]


def test_seed_reproducibility_and_n(server: Server) -> None:
    c = _client(server)
    prompt = [{"role": "user", "content": "Write one sentence about a cat."}]
    args: dict[str, Any] = dict(model=MODEL, messages=prompt, max_tokens=16, temperature=1.0, seed=1234)
    a = c.chat.completions.create(**args).choices[0].message.content
    b = c.chat.completions.create(**args).choices[0].message.content
    assert a == b
    two = c.chat.completions.create(**args, n=2)
    texts = [ch.message.content for ch in sorted(two.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(two.choices, key=lambda ch: ch.index)] == [0, 1]
    assert texts[0] == a  # choice 0 uses the seed itself, choice i the seed + i
    assert texts[0] != texts[1]
    again = c.chat.completions.create(**args, n=2)
    assert [ch.message.content for ch in sorted(again.choices, key=lambda ch: ch.index)] == texts
    assert two.usage is not None and 2 <= two.usage.completion_tokens <= 32
    streamed = c.chat.completions.create(**args, n=2, stream=True)
    by_index: dict[int, str] = {0: "", 1: ""}
    for ch in streamed:
        for choice in ch.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert [by_index[0], by_index[1]] == texts


def test_include_stop_str_in_output(server: Server) -> None:
    c = _client(server)
    ask: dict[str, Any] = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 20, "temperature": 0}
    full = c.completions.create(**ask).choices[0].text
    assert " 7" in full, full
    cut = c.completions.create(**ask, stop=[" 7"]).choices[0]
    kept = c.completions.create(**ask, stop=[" 7"], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + " 7" and full.startswith(kept.text)


def test_logprobs(server: Server) -> None:
    c = _client(server)
    r = c.chat.completions.create(
        model=MODEL,
        messages=PARIS,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    comp = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 3 and len(lp.top_logprobs or []) == 3
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]  # type: ignore[index]


def test_logit_bias_bans_and_forces_tokens(server: Server) -> None:
    c = _client(server)
    tok = Tokenizer.from_gguf(smollm2_gguf())
    ask: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    greedy = c.completions.create(**ask).choices[0].text
    ids = tok.encode(greedy)
    assert len(ids) == 1, "the greedy first token is one token"
    banned = c.completions.create(**ask, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].text != greedy
    forced = c.completions.create(**{**ask, "max_tokens": 3}, logit_bias={"28": 100})
    assert forced.choices[0].text == tok.decode([28, 28, 28])
    # vLLM's stop_token_ids: the forced token ends the output at once, kept out of the text as EOS is
    stopped = c.completions.create(
        **{**ask, "max_tokens": 3}, logit_bias={"28": 100}, extra_body={"stop_token_ids": [28]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
    assert stopped.usage is not None and stopped.usage.completion_tokens == 1
    # a token id the model does not have: refused by the host, answered as a 400 naming the field
    with pytest.raises(openai.BadRequestError) as outside:
        c.completions.create(**ask, logit_bias={str(10**7): 5})
    assert "outside the vocabulary" in outside.value.message and "logit_bias" in outside.value.message


def test_echo_scores_the_prompt_as_generation_scored_the_token(server: Server) -> None:
    """lm-evaluation-harness's loglikelihood request (echo, logprobs, max_tokens 1): the logprob echo gives a prompt
    token equals the one the same token got when it was generated after the same context."""
    c = _client(server)
    tok = Tokenizer.from_gguf(smollm2_gguf())
    ids = tok.encode("The capital of France is")
    gen = c.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1)
    glp = gen.choices[0].logprobs
    assert glp is not None and glp.token_logprobs is not None
    token_text, logprob = gen.choices[0].text, glp.token_logprobs[0]
    token = tok.encode(token_text)
    echo = c.completions.create(model=MODEL, prompt=ids + token, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = echo.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None and lp.tokens is not None
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(ids)] == pytest.approx(logprob, abs=1e-3)
    assert lp.top_logprobs[len(ids)] == {token_text: pytest.approx(logprob, abs=1e-3)}  # it was the greedy one
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert echo.choices[0].text.startswith(tok.decode(ids + token))
    assert echo.usage is not None and echo.usage.prompt_tokens == len(ids) + 1
    assert echo.usage.completion_tokens == 1
    # as the harness sends them: a batch of token-id prompts, each choice scored against its own prompt
    batch = c.completions.create(
        model=MODEL, prompt=[ids + token, ids[:3]], max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    by_index = sorted(batch.choices, key=lambda ch: ch.index)
    assert [len(ch.logprobs.tokens or []) for ch in by_index] == [len(ids) + 2, 4]  # type: ignore[union-attr]
    assert by_index[0].logprobs.token_logprobs[: len(ids) + 1] == pytest.approx(
        lp.token_logprobs[: len(ids) + 1], abs=1e-3
    )  # type: ignore[union-attr]


def test_continue_final_message_continues_the_assistant_reply(server: Server) -> None:
    c = _client(server)
    begun = [*PARIS, {"role": "assistant", "content": "The capital of France is"}]
    switches = {"add_generation_prompt": False, "continue_final_message": True}
    r = c.chat.completions.create(model=MODEL, messages=begun, max_tokens=3, temperature=0, extra_body=switches)  # type: ignore[arg-type]
    assert (r.choices[0].message.content or "").startswith(" Paris")  # the reply goes on, no new turn begins
    assert r.usage is not None and r.usage.prompt_tokens > 20
    with pytest.raises(openai.BadRequestError) as both:
        c.chat.completions.create(
            model=MODEL,
            messages=begun,  # type: ignore[arg-type]
            max_tokens=3,
            extra_body={"continue_final_message": True},
        )
    assert both.value.body["param"] == "continue_final_message"  # type: ignore[index]


def test_errors(server: Server) -> None:
    c = _client(server)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="no-such-model", messages=PARIS)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=MODEL, messages=PARIS, temperature=-1)  # type: ignore[arg-type]
    assert bad.value.code == "invalid_value" and "temperature" in bad.value.message
    # pydantic-level problems come back in OpenAI's format too, naming the field
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=server.headers,
        json={"model": MODEL, "messages": PARIS, "temperature": "hot"},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # explicit nulls mean "the default", as some clients send every field
    nulls = {"n": None, "logprobs": None, "stream": None, "stop": None, "temperature": None, "max_tokens": 2}
    r = httpx.post(
        f"{server.url}/v1/chat/completions", headers=server.headers, json={"model": MODEL, "messages": PARIS, **nulls}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    # a prompt at the context limit: refused in the API, naming the limit
    with pytest.raises(openai.BadRequestError) as long:
        c.completions.create(model=MODEL, prompt=[1] * 512, max_tokens=1)
    assert "max_seq_len = 512" in long.value.message and long.value.code == "context_length_exceeded"
    # a token id outside the vocabulary is refused by the host, and still answered as 400 before streaming
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=[10**7], max_tokens=1, stream=True)
    # fields clients commonly send are accepted and ignored
    ok = c.chat.completions.create(
        model=MODEL,
        messages=PARIS,  # type: ignore[arg-type]
        max_tokens=2,
        extra_body={"tools_unknown_field": 1, "response_format": {"type": "text"}, "store": False},
    )
    assert ok.choices[0].finish_reason == "length"


def test_api_key_is_required(server: Server) -> None:
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/admin/ps").status_code == 401
    assert httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 401
    counted = httpx.post(f"{server.url}/tokenize", headers=server.headers, json={"model": MODEL, "prompt": "hi"})
    assert counted.status_code == 200 and counted.json()["count"] >= 1
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open for probes


def test_32_concurrent_streaming_clients(server: Server) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=8,
            temperature=0.7,
            seed=i,
            stream=True,
        )
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run() -> list[tuple[str, str | None]]:
        async with _async_client(server) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(reason in ("stop", "length") for _, reason in results)
    assert all(text for text, _ in results)


def _wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_queue_full_and_disconnect_free_kv(server: Server) -> None:
    """Fill the model's in-flight limit with long streams: one more request gets 429 with Retry-After. Then every
    client hangs up: their requests are aborted and every KV block comes back."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def hold(client: httpx.AsyncClient, started: asyncio.Event) -> None:
        async with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers) as r:
            async for _ in r.aiter_lines():
                started.set()

    async def run() -> tuple[dict[str, Any], httpx.Response, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as client:
            started = asyncio.Event()  # set by whichever stream gets a token first (8 run, 24 wait)
            tasks = [asyncio.create_task(hold(client, started)) for _ in range(32)]
            await asyncio.wait_for(started.wait(), 30)
            deadline = time.monotonic() + 30
            # Until the host's own figures show the batch too: /admin/ps falls back to the last status pushed when
            # the host does not answer within a second (a loaded CI machine), which may predate the requests.
            while (busy := await asyncio.to_thread(server.ps))["in_flight"] < 32 or not busy["kv_blocks_used"]:
                assert time.monotonic() < deadline, busy
                await asyncio.sleep(0.1)
            extra = await client.post(f"{server.url}/v1/completions", json=body, headers=server.headers)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return busy, extra, await asyncio.to_thread(server.ps)

    busy, extra, _ = asyncio.run(run())
    assert busy["kv_blocks_used"] > 0 and busy["running"] == 8
    assert extra.status_code == 429 and extra.headers["Retry-After"] == "1"
    assert extra.json()["error"]["code"] == "queue_full"
    assert _wait_for(lambda: (p := server.ps())["kv_blocks_used"] == 0 and p["in_flight"] == 0 and p["running"] == 0)
    # and the model still answers
    r = _client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_non_streaming_client_that_hangs_up_is_aborted(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=1.5)
    assert _wait_for(lambda: (p := server.ps())["kv_blocks_used"] == 0 and p["in_flight"] == 0, 5)


def test_metrics(server: Server) -> None:
    for _ in range(2):  # the second finds the first's prompt in the prefix cache
        _client(server).chat.completions.create(model=MODEL, messages=PARIS, max_tokens=2)  # type: ignore[arg-type]
    text = httpx.get(f"{server.url}/metrics").text
    label = f'{{model="{MODEL}"}}'
    for name in (
        "llmhost:num_requests_running",
        "llmhost:num_requests_waiting",
        "llmhost:prompt_tokens_total",
        "llmhost:generation_tokens_total",
        "llmhost:kv_cache_usage_perc",
    ):
        assert f"{name}{label}" in text, name
    for name in (
        "llmhost:time_to_first_token_seconds",
        "llmhost:inter_token_latency_seconds",
        "llmhost:e2e_request_latency_seconds",
    ):
        assert f"{name}_count{label}" in text, name
    assert f'llmhost:model_memory_bytes{{device="cpu",kind="weights",model="{MODEL}"}}' in text
    assert 'llmhost:device_memory_bytes{device="cpu",kind="kv"}' in text
    generated = [ln for ln in text.splitlines() if ln.startswith(f"llmhost:generation_tokens_total{label}")]
    assert float(generated[0].split()[-1]) > 0
    # the chat template's prompt is about 30 tokens: its first 16-token block at least was found
    hits = [ln for ln in text.splitlines() if ln.startswith(f"llmhost:gpu_prefix_cache_hits{label}")]
    queries = [ln for ln in text.splitlines() if ln.startswith(f"llmhost:gpu_prefix_cache_queries{label}")]
    assert 0 < float(hits[0].split()[-1]) <= float(queries[0].split()[-1])


def test_ps_command(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["ps", "--url", server.url, "--api-key", KEY, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "llmhost.ps/1"
    (m,) = doc["models"]
    assert m["name"] == MODEL and m["state"] == "loaded" and m["device"] == "cpu"
    assert m["memory_total"] == sum(m["memory"].values()) > 0
    assert m["expires_at"] > time.time()
    assert cli_main(["ps", "--url", server.url, "--api-key", KEY]) == 0
    assert MODEL in capsys.readouterr().out
    assert cli_main(["ps", "--url", server.url]) == 2  # no key: one line, no traceback
    assert "--api-key" in capsys.readouterr().err


# A DOM just large enough for the dashboard's script: tables of rows of cells, text and classes kept.
DOM_STUB = """
const els = {};
class El {
  constructor() { this.children = []; this.textContent = ""; this.style = {}; this.className = ""; }
  appendChild(c) { this.children.push(c); c.parentNode = this; return c; }
  replaceChildren() { this.children = []; }
  insertRow() { return this.appendChild(new El()); }
  insertCell() { return this.appendChild(new El()); }
  createTHead() { return this.appendChild(new El()); }
  createTBody() { return this.appendChild(new El()); }
  text() { return [this.textContent, ...this.children.map(c => c.text())].join(" "); }
}
globalThis.document = {
  getElementById: id => (els[id] = els[id] || new El()),
  createElement: () => new El(),
};
globalThis.sessionStorage = {getItem: () => null, setItem: () => {}};
globalThis.setInterval = () => 0;
globalThis.fetch = async () => ({ok: true, status: 200, json: async () => PS_DOC});
process.on("beforeExit", () => {
  console.log(JSON.stringify({devices: els.devices.text(), models: els.models.text(), status: els.status.textContent}));
});
"""


def test_dashboard_page_and_the_ps_devices_it_shows(server: Server, tmp_path: Path) -> None:
    page = httpx.get(f"{server.url}/dashboard")  # the page itself needs no key; its data does
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/admin/ps" in page.text
    doc = httpx.get(f"{server.url}/admin/ps", headers=server.headers).json()
    (dev,) = doc["devices"]
    assert dev["label"] == "cpu" and dev["models"] == [MODEL] and dev["total"] > 0
    (m,) = doc["models"]
    assert {"gpu_share", "host_copy_bytes", "swaps_in", "last_swap_s"} <= set(m)
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node here to run the page's script")
    script = page.text.split("<script>")[1].split("</script>")[0]
    (tmp_path / "page.js").write_text(f"const PS_DOC = {json.dumps(doc)};\n{DOM_STUB}\n{script}")
    out = subprocess.run([node, str(tmp_path / "page.js")], capture_output=True, text=True, timeout=30, check=True)
    shown = json.loads(out.stdout)
    assert MODEL in shown["models"] and "loaded" in shown["models"] and "cpu" in shown["devices"]
    assert shown["status"].startswith("updated")


def test_admin_unload_then_on_demand_and_admin_load(server: Server) -> None:
    c = _client(server)
    r = httpx.post(f"{server.url}/admin/models/{MODEL}/unload", headers=server.headers, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "unloaded" and r.json()["memory_total"] == 0
    # a request for an unloaded model loads it and is answered
    assert c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=2).choices  # type: ignore[arg-type]
    assert server.ps()["state"] == "loaded"
    r = httpx.post(f"{server.url}/admin/models/{MODEL}/unload", headers=server.headers, timeout=30)
    assert r.json()["state"] == "unloaded"
    r = httpx.post(f"{server.url}/admin/models/{MODEL}/load", headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "loaded"
    assert c.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=2).choices  # type: ignore[arg-type]
    assert httpx.post(f"{server.url}/admin/models/nope/load", headers=server.headers).status_code == 404


def test_default_config_answers_paris_and_sigterm_stops_everything(tmp_path: Path) -> None:
    """No --config: the embedded SmolLM2 (chat) and Gemma 3 270M (completions). Then SIGTERM during a stream: the
    stream ends with an error event, the server exits 0, and no process it started (the host, multiprocessing's
    helper) is left."""
    srv = Server([], tmp_path / "default.log", api_key=None)
    try:
        srv.wait_loaded("smollm2-135m")
        srv.wait_loaded("gemma3-270m")
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in c.models.list().data] == ["smollm2-135m", "gemma3-270m"]
        assert f"dashboard: {srv.url}/dashboard" in srv.log.read_text()
        r = c.chat.completions.create(model="smollm2-135m", messages=PARIS, max_tokens=16, temperature=0)  # type: ignore[arg-type]
        assert "Paris" in (r.choices[0].message.content or "")
        # the base model needs one example sentence to answer with the city (see test_gemma3.py)
        prompt = "The capital of Germany is Berlin. The capital of France is"
        g = c.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=8, temperature=0)
        assert "Paris" in g.choices[0].text
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children, "the host process should be a child of the server"
        stream = c.completions.create(
            model="smollm2-135m",
            prompt="Once upon a time",
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert srv.proc.wait(20) == 0
        assert time.monotonic() - t0 < 15
        assert _wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children), 10)
    finally:
        srv.stop()
