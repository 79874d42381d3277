"""Tokenizer: GGUF conversion checked against transformers' own GGUF loading (real SmolLM2 file, synthetic
SentencePiece and byte-level files), the conversion cache, HF directories, chat templates, streaming decode."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from checkpoint_files import smollm2_gguf, tiny_config, write_hf_checkpoint
from tokenizers import AddedToken, SentencePieceBPETokenizer, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HfBackend

from llmhost.engine import tokenizer as tokenizer_module
from llmhost.engine.chat_template import ChatTemplate, ChatTemplateError
from llmhost.engine.tokenizer import IncrementalDecoder, Tokenizer
from llmhost.errors import ModelFileError, RequestError, UnsupportedModelError
from llmhost.model_files import open_checkpoint

gguf = pytest.importorskip("gguf")

# Varied text: words, code, accents and CJK, emoji (multi-codepoint, split across byte tokens), digits, runs of
# spaces, tabs and newlines, special-token text, contractions, empty.
TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "Ünïcödé façade naïve — 日本語の文章 中文 한국어 Ελληνικά",
    "🙂👍🏽 family: 👨\u200d👩\u200d👧 flags 🇫🇷",
    "In 2024, 3.14159 and 1,000,000; call 555-0123",
    "   leading  and   trailing   ",
    "\t\ttabs\n\n\nnewlines\r\nwindows",
    "<|im_start|>user\nhi<|im_end|>",
    "it's we're they'll I'd DON'T",
    "",
    " ",
    "a" * 200,
]

CHATML_FRANCE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smol(cache_root: Path) -> Tokenizer:
    return Tokenizer.from_checkpoint(open_checkpoint(smollm2_gguf()), cache_dir=cache_root)


@pytest.fixture(scope="module")
def smol_ref() -> Any:
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- real SmolLM2 GGUF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_gguf_matches_transformers(smol: Tokenizer, smol_ref: Any, text: str) -> None:
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text)
    assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True)
    assert smol.decode(ids, skip_special_tokens=False) == smol_ref.decode(ids, skip_special_tokens=False)
    assert smol.decode(ids, skip_special_tokens=False) == text


def test_smollm2_digits_split_like_the_models_own_tokenizer(smol: Tokenizer, smol_ref: Any) -> None:
    # SmolLM2's tokenizer.json (and llama.cpp for pre 'smollm') splits every numeric character alone before the
    # GPT-2 regex. transformers' GGUF loader does not; for ASCII digits it makes no difference (the vocabulary
    # has no digit merges), for '²³' it does. Reference: transformers' backend with the model's own pre-tokenizer.
    reference = copy.deepcopy(smol_ref.backend_tokenizer)
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in ["x ²³ y", "12345 ٣٤", "E = mc² at 300K"]:
        assert smol.encode(text) == reference.encode(text).ids


def test_smollm2_special_tokens(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.bos_token_id == 1  # <|im_start|>, but SmolLM2 adds no BOS
    assert smol.settings.add_bos_token is False
    assert smol.encode("hi")[0] != smol.bos_token_id
    # eos <|im_end|> first; <|endoftext|> is a control end-of-generation token too (as llama.cpp treats it).
    assert smol.eos_token_ids == (2, 0)
    assert smol.settings.pad_token_id == 2


def test_smollm2_chat_template_renders_chatml(smol: Tokenizer, smol_ref: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smol.apply_chat_template(messages)
    assert prompt == CHATML_FRANCE
    assert prompt == smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(messages, add_generation_prompt=False) == CHATML_FRANCE.removesuffix(
        "<|im_start|>assistant\n"
    )
    ids = smol.encode(prompt)
    assert ids[0] == smol.token_to_id("<|im_start|>") == 1
    assert ids.count(2) == 2 and smol.token_to_id("<|im_end|>") == 2


def test_continue_final_message_matches_transformers(smol: Tokenizer, smol_ref: Any) -> None:
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is "},
    ]
    ours = smol.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours == smol_ref.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours.endswith("<|im_start|>assistant\nThe capital of France is ")
    with pytest.raises(RequestError) as both:
        smol.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)
    assert both.value.param == "continue_final_message"
    with pytest.raises(ChatTemplateError, match="needs text in the last message"):
        smol.encode_chat([*messages[:1], {"role": "assistant", "content": " "}], False, True)


def test_chat_template_kwargs_reach_the_template_but_not_its_own_variables() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if think %}<think>{% endif %}{{ bos_token }}", "test"
    )
    hi = [{"role": "user", "content": "hi"}]
    assert template.render(hi, True, {"bos_token": "<s>"}, {"think": True}) == "hi<think><s>"
    assert template.render(hi, True, {"bos_token": "<s>"}, {"think": False}) == "hi<s>"
    for key in ("messages", "add_generation_prompt", "bos_token"):
        with pytest.raises(RequestError, match=f"may not set {key}") as info:
            template.render(hi, True, {"bos_token": "<s>"}, {key: "x"})
        assert info.value.param == "chat_template_kwargs"


def test_gguf_conversion_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = smollm2_gguf()
    first = Tokenizer.from_gguf(path, cache_dir=tmp_path)
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {p.name for p in cached[0].iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }

    def no_rebuild(*args: Any) -> Any:
        raise AssertionError("the cached tokenizer was converted again")

    monkeypatch.setattr(tokenizer_module, "build_gguf_tokenizer", no_rebuild)
    second = Tokenizer.from_gguf(path, cache_dir=tmp_path)
    for text in TEXTS:
        assert second.encode(text) == first.encode(text)
    assert second.eos_token_ids == first.eos_token_ids and second.bos_token_id == first.bos_token_id
    assert second.apply_chat_template([{"role": "user", "content": "hi"}]) == first.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )
    assert str(second.source) == str(path)  # messages name the GGUF, not the cache


def test_gguf_cache_default_dir_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_byte_level_gguf(tmp_path / "m.gguf", pre="qwen2")
    monkeypatch.setenv("LLMHOST_CACHE_DIR", str(tmp_path / "env-cache"))
    Tokenizer.from_gguf(path)
    assert len(list((tmp_path / "env-cache" / "tokenizers").iterdir())) == 1
    # A file replaced in place (new mtime) is converted again, under a new key.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    Tokenizer.from_gguf(path)
    assert len(list((tmp_path / "env-cache" / "tokenizers").iterdir())) == 2


def test_unreadable_cache_is_rebuilt(tmp_path: Path) -> None:
    path = write_byte_level_gguf(tmp_path / "m.gguf", pre="qwen2")
    good = Tokenizer.from_gguf(path, cache_dir=tmp_path / "c").encode("hello world")
    [cached] = (tmp_path / "c" / "tokenizers").iterdir()
    (cached / "tokenizer.json").write_text("{not json")
    assert Tokenizer.from_gguf(path, cache_dir=tmp_path / "c").encode("hello world") == good
    assert Tokenizer.from_gguf(path, cache_dir=tmp_path / "c").encode("hello world") == good


def test_cache_race_keeps_the_first_copy_and_unwritable_cache_still_loads(tmp_path: Path) -> None:
    path = write_byte_level_gguf(tmp_path / "m.gguf", pre="qwen2")
    first = Tokenizer.from_gguf(path, cache_dir=tmp_path / "c")
    [target] = (tmp_path / "c" / "tokenizers").iterdir()
    before = (target / "tokenizer_config.json").read_text()
    # A second process that finished converting after us: its rename fails, ours stays, no temp dir is left.
    tokenizer_module._write_cache(target, first._backend, {"late": True}, {}, replace=False)
    assert (target / "tokenizer_config.json").read_text() == before
    assert [p.name for p in (tmp_path / "c" / "tokenizers").iterdir()] == [target.name]
    # A cache root that cannot be created: the conversion still serves this load.
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert Tokenizer.from_gguf(path, cache_dir=blocker).encode("hello") == first.encode("hello")


# -- streaming decode --------------------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    dec = IncrementalDecoder(tok, skip_special_tokens)
    deltas = [dec.feed(i) for i in ids]
    deltas.append(dec.flush())
    return deltas


def test_incremental_decoder_holds_back_split_characters(smol: Tokenizer) -> None:
    text = "Emoji 🙂👍🏽 and 👨\u200d👩\u200d👧, accents naïve, CJK 日本語"
    ids = smol.encode(text)
    # The test means something only if some character's bytes really span tokens.
    assert any(smol.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    deltas = stream(smol, ids)
    assert "".join(deltas) == smol.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing held back at the end of complete text


def test_incremental_decoder_random_ids_concatenate_to_decode(smol: Tokenizer) -> None:
    # Random ids include special tokens and byte tokens that never form valid UTF-8: the invariant must still hold.
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert "".join(stream(smol, ids, skip)) == smol.decode(ids, skip_special_tokens=skip)


def test_incremental_decoder_sentencepiece_keeps_spaces_mid_stream(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(write_sentencepiece_gguf(tmp_path, "llama"), cache_dir=tmp_path / "c")
    text = "Hello world, the quick brown fox 🙂 jumps"
    ids = tok.encode(text)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert any(d.startswith(" ") for d in deltas)  # a word's leading space survives the window start
    assert not any("\ufffd" in d for d in deltas)
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_incremental_decoder_flush_returns_a_dangling_partial_character(smol: Tokenizer) -> None:
    ids = smol.encode("ok 👍🏽 👨\u200d👩\u200d👧")
    cut = next(k for k in range(1, len(ids)) if smol.decode(ids[:k]).endswith("\ufffd"))
    dec = IncrementalDecoder(smol)
    text = "".join(dec.feed(i) for i in ids[:cut])
    assert "\ufffd" not in text
    assert text + dec.flush() == smol.decode(ids[:cut])


# -- synthetic GGUF files ----------------------------------------------------------------------------------------

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, general Kenobi.",
    "Tokenizers split text into pieces; pieces map to ids.",
    "def main():\n    print('hello')\n",
    "numbers 12345 and 67890, the year 2024",
    "café naïve façade",
    "the the the them they there their",
] * 20


def _write_gguf(path: Path, arch: str, tokenizer_keys: dict[str, Any], n_vocab: int) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    if arch.startswith("gemma"):
        w.add_key_length(4)
        w.add_value_length(4)
    for key, value in tokenizer_keys.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_sentencepiece_gguf(tmp: Path, arch: str, add_space_prefix: bool | None = None) -> Path:
    """A 'llama' (SentencePiece BPE) vocabulary as llama.cpp writes one: <unk> <s> </s>, 256 byte tokens, a
    user-defined <think>, then pieces trained here with scores = -merge rank. Gemma files add tokens of spaces."""
    spm = SentencePieceBPETokenizer(add_prefix_space=True)
    spm.train_from_iterator(_CORPUS, vocab_size=300, min_frequency=2, show_progress=False)
    pieces = [p for p, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<think>"]
    types = [2, 3, 3, *[6] * 256, 4]
    scores = [0.0] * len(tokens)
    if arch.startswith("gemma"):
        tokens += ["  ", "   "]
        types += [1, 1]
        scores += [-1.0, -2.0]
    for rank, piece in enumerate(pieces):
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)
            scores.append(-float(rank))
    keys: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{{ eos_token }}{% endfor %}",
    }
    if add_space_prefix is not None:
        keys["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    name = f"{arch}-{add_space_prefix}.gguf"
    return _write_gguf(tmp / name, arch, keys, len(tokens))


def write_byte_level_gguf(path: Path, pre: str | None, model: str = "gpt2", merges: bool = True) -> Path:
    """A 'gpt2' (byte-level BPE) vocabulary trained here, with ChatML control tokens first."""
    backend = HfBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    model_json = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model_json["vocab"].items(), key=lambda kv: kv[1])]
    keys: dict[str, Any] = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    if pre is not None:
        keys["tokenizer.ggml.pre"] = pre
    if merges:
        keys["tokenizer.ggml.merges"] = [" ".join(m) if isinstance(m, list) else m for m in model_json["merges"]]
    return _write_gguf(path, "qwen2", keys, len(tokens))


SYNTHETIC_TEXTS = [
    "Hello world",
    "The quick brown fox",
    " leading space",
    "two  spaces",
    "new\nline\n\n",
    "unseen: zq€🙂 日本",
    "think <think> ok",
    "numbers 12345 and 2024",
    "",
    " ",
]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_gguf_matches_transformers(tmp_path: Path, arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_sentencepiece_gguf(tmp_path, arch)
    ours = Tokenizer.from_gguf(path, cache_dir=tmp_path / "c")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SYNTHETIC_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1  # SentencePiece vocabularies add BOS by default
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.eos_token_ids == (2,)
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[user] hi</s>"


def test_sentencepiece_gguf_without_space_prefix(tmp_path: Path) -> None:
    # transformers ignores tokenizer.ggml.add_space_prefix; llama.cpp honours it, and so do we.
    tok = Tokenizer.from_gguf(write_sentencepiece_gguf(tmp_path, "llama", add_space_prefix=False), tmp_path / "c")
    with_prefix = Tokenizer.from_gguf(write_sentencepiece_gguf(tmp_path, "llama"), tmp_path / "c")
    assert tok.encode("Hello")[1] != with_prefix.token_to_id("\u2581Hello")
    assert tok.encode(" Hello")[1:] == with_prefix.encode("Hello")[1:]
    for text in SYNTHETIC_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_encode_does_not_double_bos(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(write_sentencepiece_gguf(tmp_path, "llama"), cache_dir=tmp_path / "c")
    ids = tok.encode("<s>Hello")
    assert ids == tok.encode("<s>Hello", add_special_tokens=False) and ids.count(1) == 1
    assert tok.encode("Hello", add_special_tokens=False)[0] != tok.bos_token_id


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-4o", None])
def test_byte_level_gguf_pre_tokenizers_match_transformers(tmp_path: Path, pre: str | None) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_byte_level_gguf(tmp_path / "m.gguf", pre)
    ours = Tokenizer.from_gguf(path, cache_dir=tmp_path / "c")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*SYNTHETIC_TEXTS, *TEXTS]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"pre": "no-such-pre"}, UnsupportedModelError, "no-such-pre"),
        ({"pre": "qwen2", "model": "bert"}, UnsupportedModelError, "'bert'"),
        ({"pre": "qwen2", "merges": False}, ModelFileError, "merges"),
    ],
)
def test_gguf_tokenizer_errors(tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], says: str) -> None:
    path = write_byte_level_gguf(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(error, match=says) as info:
        Tokenizer.from_gguf(path, cache_dir=tmp_path / "c")
    assert str(path) in str(info.value)


def test_gguf_without_tokens(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", "llama", {"tokenizer.ggml.model": "llama"}, 4)
    with pytest.raises(ModelFileError, match="no tokenizer"):
        Tokenizer.from_gguf(path, cache_dir=tmp_path / "c")


# -- HF directories ----------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_hf_tokenizer(dir: Path, post_bos: bool = False) -> HfBackend:
    """A tiny byte-level BPE trained here, saved as tokenizer.json. post_bos: its post-processor adds <s>, as
    Llama 3's tokenizer.json adds <|begin_of_text|>."""
    backend = HfBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    if post_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(dir / "tokenizer.json"))
    return backend


def test_hf_dir_tokenizer(tmp_path: Path) -> None:
    ckpt_dir = write_hf_checkpoint(tmp_path / "m", tiny_config("smollm2-135m"))
    backend = write_hf_tokenizer(ckpt_dir)
    tok_cfg = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
    }
    (ckpt_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (ckpt_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    tok = Tokenizer.from_checkpoint(open_checkpoint(ckpt_dir))

    im_end, endoftext = backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == (im_end, endoftext)  # tokenizer_config's eos first, generation_config's after
    assert tok.bos_token_id is None and tok.settings.add_bos_token is False
    assert tok.vocab_size == backend.get_vocab_size()
    for text in [*TEXTS, "a <think> b"]:
        ids = tok.encode(text)
        assert ids == backend.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"  # special tokens skipped by default
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_dir_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    write_hf_tokenizer(tmp_path)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    ours = Tokenizer.from_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_hf_dir_bos_from_post_processor_or_config(tmp_path: Path) -> None:
    backend = write_hf_tokenizer(tmp_path, post_bos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    plain = backend.encode("hello", add_special_tokens=False).ids
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.bos_token_id == 0 and tok.settings.add_bos_token
    assert tok.encode("hello") == [0, *plain]
    assert tok.encode("<s>hello") == [0, *plain]  # not doubled
    assert tok.encode("hello", add_special_tokens=False) == plain
    # An explicit add_bos_token wins over the post-processor, as in transformers.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": False}))
    assert Tokenizer.from_hf_dir(tmp_path).encode("hello") == plain


def test_hf_dir_chat_template_file_and_generation_config_int(tmp_path: Path) -> None:
    write_hf_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "bos_token_id": 0}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_token_ids == (3,) and tok.settings.special_tokens["eos_token"] == "<|im_end|>"
    assert tok.bos_token_id == 0
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x"


def test_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"no tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFileError, match=r"not a valid tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    write_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="expected a JSON object"):
        Tokenizer.from_hf_dir(tmp_path)


# -- chat templates ------------------------------------------------------------------------------------------------


def test_missing_chat_template_is_a_request_error(tmp_path: Path) -> None:
    write_hf_tokenizer(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template") as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, RequestError) and info.value.param == "messages"
    assert str(tmp_path) in str(info.value)


def test_chat_template_raise_exception_and_syntax_errors() -> None:
    strict = ChatTemplate(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}",
        "model.gguf",
    )
    assert strict.render([{"role": "user", "content": "a"}], True, {}) == "a"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.render([{"role": "assistant", "content": "a"}], True, {})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", "model.gguf").render([], True, {})
    with pytest.raises(ChatTemplateError, match="cannot render"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", "x").render([{"role": "user", "content": "a"}], True, {})


def test_chat_template_hf_features() -> None:
    template = ChatTemplate(
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
        "{% endif %}{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}\n"
        "{% if pad_token is defined %}pad{% endif %}{{ strftime_now('%Y')[:2] }}",
        "x",
    )
    messages = [{"role": "user", "content": "<b>&é"}, {"role": "assistant", "content": "ok"}, {"role": "user"}]
    out = template.render(messages, True, {"bos_token": "<s>"})
    # tojson keeps <, > and & and non-ASCII as they are (jinja2's own escapes them); loop controls work; an
    # undefined special token is not defined; trim_blocks eats the newline after a block tag, as in transformers.
    assert out == '<s>{"role": "user", "content": "<b>&é"}{"role": "assistant", "content": "ok"}20'
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}", "x").render([], True, {})
