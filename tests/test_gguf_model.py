"""The real SmolLM2-135M-Instruct Q4_1 GGUF through our engine: it answers, and its log-probabilities match
transformers' own GGUF loading of the same file.

Tolerance: both sides dequantize Q4_1/Q8_0 blocks to the same float32 weights (d * q + m is exact arithmetic in
float32), then run float32 forwards that differ only in operation order (our fused q/k/v and gate/up GEMMs,
different reductions). Float32 rounding is ~6e-8 relative per operation; over 30 layers the logits drift by
~1e-5 relative, so log-probabilities agree to 1e-4 absolute with room to spare.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.text_stream import stream_text
from llmhost.engine.tokenizer import Tokenizer
from llmhost.model_files import open_checkpoint
from tests.checkpoint_files import smollm2_gguf

LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[Engine, Tokenizer]]:
    path = smollm2_gguf()
    ckpt = open_checkpoint(path)
    tok = Tokenizer.from_checkpoint(ckpt)
    cfg = ModelConfig("smollm2", path, dtype="float32", max_seq_len=512, max_batch=4)
    yield Engine.load(cfg, "cpu", checkpoint=ckpt, eos_token_ids=tok.eos_token_ids), tok


def chat_ids(tok: Tokenizer, question: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]), add_special_tokens=False)


def test_answers_paris(smollm2: tuple[Engine, Tokenizer]) -> None:
    engine, tok = smollm2
    ids = chat_ids(tok, "What is the capital of France?")
    text = "".join(d.text for d in stream_text(engine, tok, ids, SamplingParams(max_tokens=40, temperature=0.0)))
    assert "Paris" in text
    assert engine.blocks.free_count == engine.blocks.num_blocks


def test_logprobs_match_transformers_gguf_loading(smollm2: tuple[Engine, Tokenizer]) -> None:
    transformers = pytest.importorskip("transformers")
    engine, tok = smollm2
    path = smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = chat_ids(tok, "Name three colours.")
    (done,) = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, ignore_eos=True))
    with torch.no_grad():
        logits = ref(torch.tensor([ids + done.output_ids])).logits[0]
    ref_logprobs = torch.log_softmax(logits.double(), dim=-1)
    for step, (token, ours) in enumerate(zip(done.output_ids, done.logprobs, strict=True)):
        expected = ref_logprobs[len(ids) - 1 + step]
        assert token == int(expected.argmax()), f"step {step}: greedy token differs"
        assert ours is not None and abs(ours - float(expected[token])) < LOGPROB_ATOL, step
