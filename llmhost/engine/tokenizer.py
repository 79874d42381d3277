"""Tokenizer: text <-> token ids for one model, plus the IncrementalDecoder that streams text from new ids.

An HF directory brings its tokenizer.json. A GGUF file brings only llama.cpp's vocabulary metadata, which is
converted once into a `tokenizers` tokenizer (following the rules of llama.cpp and of transformers' own GGUF
loader) and cached as an HF-style directory, so every later load is the HF path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from llmhost.engine.chat_template import ChatTemplate, ChatTemplateError
from llmhost.errors import ModelFileError, RequestError, UnsupportedModelError
from llmhost.model_files.checkpoint import Checkpoint
from llmhost.model_files.gguf_file import read_gguf

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Bump when the GGUF conversion changes: it is part of the cache key, so stale conversions are not reused.
_CONVERTER_VERSION = 1


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer.json does not say, from tokenizer_config.json / generation_config.json or GGUF metadata."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # every id that ends generation; the tokenizer's own eos first
    pad_token_id: int | None
    add_bos_token: bool
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ... as strings, for chat templates
    chat_template: ChatTemplate | None


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, settings: TokenizerSettings, source: Path) -> None:
        self._backend = backend
        self.settings = settings
        self.source = source  # the HF directory or the GGUF file, for messages
        self.bos_token_id = settings.bos_token_id
        self.eos_token_ids = settings.eos_token_ids
        # Ids the tokenizer can produce; a model's embedding may be padded past this.
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        # SentencePiece byte tokens <0x00>..<0xFF>: a run of them decodes as one UTF-8 sequence, all or nothing.
        byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        vocab = backend.get_vocab(with_added_tokens=False) if byte_fallback else {}
        self.byte_fallback_ids = frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, cache_dir: Path | None = None) -> Tokenizer:
        if ckpt.format == "gguf":
            return cls.from_gguf(ckpt.path, cache_dir)
        return cls.from_hf_dir(ckpt.path)

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        return _load_hf_dir(path, origin=path)

    @classmethod
    def from_gguf(cls, path: Path, cache_dir: Path | None = None) -> Tokenizer:
        cached = _gguf_cache_path(path, cache_dir)
        stale = (cached / "tokenizer.json").is_file()
        if stale:
            try:
                return _load_hf_dir(cached, origin=path)
            except ModelFileError as e:
                log.warning("rebuilding the tokenizer of %s: its cache is unreadable (%s)", path, e)
        backend, tok_cfg, gen_cfg = build_gguf_tokenizer(read_gguf(path).metadata, path)
        _write_cache(cached, backend, tok_cfg, gen_cfg, replace=stale)
        return Tokenizer(backend, _settings(backend, tok_cfg, gen_cfg, {}, None, path), path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens adds BOS where the model wants it, unless the text already starts with it (a chat
        template that writes `{{ bos_token }}`): a doubled BOS degrades output, and transformers would double it."""
        # encode_batch of one text gives what encode gives, and it lets go of the GIL while it runs: the server
        # tokenizes on a worker thread, and a long prompt no longer holds every other request and /health.
        ids: list[int] = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        bos = self.bos_token_id
        if add_special_tokens and self.settings.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Messages through the chat template, then token ids: no BOS added, the template writes its own."""
        text = self.apply_chat_template(messages, add_generation_prompt, continue_final_message, extra)
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """continue_final_message (transformers' and vLLM's): the prompt ends inside the last message, right after
        its text, so the model continues it (an assistant reply begun by the client) instead of starting a new
        one. extra: more template variables (ChatTemplate.render)."""
        template = self.settings.chat_template
        if template is None:
            raise ChatTemplateError(
                f"{self.source} has no chat template (tokenizer_config.json 'chat_template', chat_template.jinja or "
                "GGUF 'tokenizer.chat_template'); send a plain completion prompt instead"
            )
        if not continue_final_message:
            return template.render(messages, add_generation_prompt, self.settings.special_tokens, extra)
        check_prompt_switches(add_generation_prompt, continue_final_message)
        final = (messages[-1].get("content") or "") if messages else ""
        if not final.strip():
            raise ChatTemplateError("continue_final_message needs text in the last message to continue")
        text = template.render(messages, False, self.settings.special_tokens, extra)
        # Cut after the last occurrence of the message's text: what the template writes after it (end-of-turn
        # tokens) would end the message. As sent, else stripped: many templates trim the content they write.
        for written in (final, final.strip()):
            if (end := text.rfind(written)) >= 0:
                return text[: end + len(written)]
        raise ChatTemplateError(
            "continue_final_message: the chat template does not write the last message's text as sent, so the "
            "prompt cannot end inside it; send the conversation without it"
        )


def check_prompt_switches(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """RequestError when both are set: one continues the last message, the other starts a new one."""
    if add_generation_prompt and continue_final_message:
        raise RequestError(
            "continue_final_message continues the last message, add_generation_prompt starts a new one: send "
            "add_generation_prompt: false with it",
            "continue_final_message",
        )


class IncrementalDecoder:
    """Streams one sequence's text: `feed(id)` returns the text that id adds, `flush()` what is still held back.

    Invariant: the concatenation of every delta and the final flush equals `tokenizer.decode(all ids)`.
    A delta never ends inside a UTF-8 character: while the decoded text ends with U+FFFD (bytes of a character
    split across tokens), or ends in SentencePiece byte tokens, nothing is emitted. Each step decodes only a
    short window (the ids of the last emitted delta plus the new ones), not the whole sequence; the window's
    first ids give the decoder its context, so a leading space that a SentencePiece decoder strips at the start
    of a text is kept mid-sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: the first id of the last emitted delta
        self._read_offset = 0  # ids before this are emitted

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._in_byte_run():
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The held-back text (a sequence that ended inside a character decodes to U+FFFD there, as decode does)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.ids))
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def _in_byte_run(self) -> bool:
        """True while the text ends in a run of byte-fallback tokens (skipped special tokens do not end a run).
        The ByteFallback decoder turns every byte of a run into U+FFFD when the run is not valid UTF-8, so even
        "9" (<0x39>) may still change into U+FFFD when an invalid byte follows: emit nothing until the run ends."""
        tok = self._tokenizer
        if not tok.byte_fallback_ids:
            return False
        for i in reversed(self.ids):
            if not (self._skip and i in tok.special_ids):
                return i in tok.byte_fallback_ids
        return False

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self.ids[start:end], skip_special_tokens=self._skip) if end > start else ""


# -- HF directory ---------------------------------------------------------------------------------------------


def _load_hf_dir(path: Path, origin: Path) -> Tokenizer:
    """origin: what the user pointed at (the GGUF file for a cached conversion), named in messages."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        hint = (
            " (it has only a slow tokenizer.model: save it with transformers' save_pretrained)"
            if (path / "tokenizer.model").is_file()
            else ""
        )
        raise ModelFileError(f"{path}: no tokenizer.json; llmhost needs the fast-tokenizer file{hint}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # the Rust side raises a bare Exception for every parse error
        raise ModelFileError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
    tok_cfg = _read_json(path / "tokenizer_config.json")
    gen_cfg = _read_json(path / "generation_config.json")
    model_cfg = _read_json(path / "config.json")
    jinja_file = path / "chat_template.jinja"
    template_file = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
    if template_file is None and "chat_template" not in tok_cfg:
        template_file = _read_json(path / "chat_template.json").get("chat_template")
    return Tokenizer(backend, _settings(backend, tok_cfg, gen_cfg, model_cfg, template_file, origin), origin)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    # generation_config.json's eos_token_id is an int or a list of ints (Llama 3: [128001, 128008, 128009]).
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _settings(
    backend: tokenizers.Tokenizer,
    tok_cfg: Mapping[str, Any],
    gen_cfg: Mapping[str, Any],
    model_cfg: Mapping[str, Any],
    template_file: str | None,
    origin: Path,
) -> TokenizerSettings:
    special: dict[str, str] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(tok_cfg.get(name))
        if text is not None:
            special[name] = text

    def token_id(name: str, key: str) -> int | None:
        text = special.get(name)
        found = backend.token_to_id(text) if text is not None else None
        # Only a token tokenizer_config.json leaves out falls back to the model's ids; an explicit null (Qwen's
        # bos_token) means the tokenizer has none.
        if found is None and name not in tok_cfg:
            found = next(iter(_ids(gen_cfg.get(key)) or _ids(model_cfg.get(key))), None)
            if found is not None and name not in special:
                special[name] = backend.id_to_token(found) or ""
        return found

    bos_id = token_id("bos_token", "bos_token_id")
    pad_id = token_id("pad_token", "pad_token_id")
    eos_ids: list[int] = []
    eos_text = special.get("eos_token")
    eos_id = backend.token_to_id(eos_text) if eos_text is not None else None
    candidates = [eos_id] if eos_id is not None else []
    candidates += _ids(gen_cfg.get("eos_token_id")) or _ids(model_cfg.get("eos_token_id"))
    for i in candidates:
        if i not in eos_ids:
            eos_ids.append(i)
    if "eos_token" not in special and eos_ids:
        special["eos_token"] = backend.id_to_token(eos_ids[0]) or ""

    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # No flag: the model's tokenizer.json decides through its post-processor (Llama 3 adds
        # <|begin_of_text|> there). Encoding here never runs the post-processor, so find out what it would add.
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_special == [bos_id, *backend.encode("a", add_special_tokens=False).ids]

    return TokenizerSettings(
        bos_token_id=bos_id,
        eos_token_ids=tuple(eos_ids),
        pad_token_id=pad_id,
        add_bos_token=add_bos,
        special_tokens=special,
        chat_template=_chat_template(tok_cfg, template_file, origin),
    )


def _chat_template(tok_cfg: Mapping[str, Any], template_file: str | None, origin: Path) -> ChatTemplate | None:
    value = tok_cfg.get("chat_template")
    if isinstance(value, list):
        # Older multi-template form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if isinstance(value, str) and value:
        return ChatTemplate(value, f"{origin}")
    if template_file:
        return ChatTemplate(template_file, f"{origin}")
    return None


# -- GGUF -> tokenizers -------------------------------------------------------------------------------------

# llama.cpp token types (tokenizer.ggml.token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Pre-tokenizer splits by tokenizer.ggml.pre, as llama.cpp applies them (llama-vocab.cpp) and transformers copies.
_GPT2_SPLIT = None  # ByteLevel's own regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = "digits"  # StarCoder-family vocabularies (SmolLM): every digit alone, then GPT-2's regex
_PRE_SPLITS: dict[str, str | None] = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "phi-2": _GPT2_SPLIT,
    "olmo": _GPT2_SPLIT,
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}

# Control tokens that end a turn although the file does not name them eos (llama.cpp treats them as end of
# generation too): a chat model that emits <|endoftext|> or <end_of_turn> is done.
_END_OF_GENERATION_TEXTS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
     "<EOT>", "<|return|>"}
)  # fmt: skip


def build_gguf_tokenizer(
    meta: Mapping[str, Any], path: Path
) -> tuple[tokenizers.Tokenizer, dict[str, Any], dict[str, Any]]:
    """GGUF metadata -> (backend, tokenizer_config.json content, generation_config.json content)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFileError(f"{path}: no tokenizer.ggml.tokens; this GGUF carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(types, list) or len(types) != len(tokens):
        types = [1] * len(tokens)
    kind = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture", ""))
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens, types, path)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types, arch, path)
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
        add_bos_default = True
    else:
        raise UnsupportedModelError(
            f"{path}: tokenizer.ggml.model is {kind!r}; llmhost converts 'gpt2' (byte-level BPE) and 'llama' "
            "(SentencePiece) GGUF tokenizers"
        )

    def token(key: str) -> tuple[int | None, str | None]:
        i = meta.get(f"tokenizer.ggml.{key}")
        return (i, tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else (None, None)

    tok_cfg: dict[str, Any] = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):  # fmt: skip
        if (text := token(key)[1]) is not None:
            tok_cfg[f"{name}_token"] = text
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tok_cfg["chat_template"] = template

    eos: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if (i := token(key)[0]) is not None and i not in eos:
            eos.append(i)
    eos += [i for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
            if ty == _CONTROL and t in _END_OF_GENERATION_TEXTS and i not in eos]  # fmt: skip
    gen_cfg: dict[str, Any] = {"eos_token_id": eos}
    if (bos := token("bos_token_id")[0]) is not None:
        gen_cfg["bos_token_id"] = bos
    return backend, tok_cfg, gen_cfg


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte as a printable character, so BPE works on text, not bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int], path: Path) -> tokenizers.Tokenizer:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_SPLITS:
        # llama.cpp refuses an unknown pre-tokenizer too: a wrong split tokenizes every prompt subtly wrong.
        raise UnsupportedModelError(
            f"{path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer llmhost does not know "
            f"(it knows {', '.join(sorted(_PRE_SPLITS))})"
        )
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ModelFileError(f"{path}: a 'gpt2' tokenizer without tokenizer.ggml.merges; the file is incomplete")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp's converter writes some tokens as plain text; the BPE must see them in the byte alphabet.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = BPE(vocab=vocab, merges=[(p[0], p[1]) for p in pairs if len(p) == 2], dropout=None, fuse_unk=False)
    backend = tokenizers.Tokenizer(bpe)
    split = _PRE_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a converter's mislabel (it is a plain word): making it
    # special would let it match inside text the model never saw it in.
    _add_special_tokens(backend, meta, tokens, types, keep=lambda t: set(t) <= alphabet)
    return backend


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], arch: str, path: Path
) -> tokenizers.Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    gemma = arch.startswith("gemma")
    pieces = tokens
    priority: dict[str, float] = {}
    if gemma:
        # Gemma files store a token of spaces as real spaces while its pieces spell a space '▁', and its scores do
        # not follow its merge order: the order of the tokens in the file does (transformers does the same).
        pieces = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = {t: -i for i, t in enumerate(pieces)}
    elif isinstance(scores, list) and len(scores) == len(tokens):
        priority = dict(zip(tokens, (float(s) for s in scores), strict=True))
    elif "tokenizer.ggml.merges" not in meta:
        raise ModelFileError(f"{path}: a 'llama' tokenizer without tokenizer.ggml.scores; the file is incomplete")
    vocab = {t: i for i, t in enumerate(pieces)}
    file_merges = meta.get("tokenizer.ggml.merges")
    if isinstance(file_merges, list):
        merges = [(a, b) for a, _, b in (m.partition(" ") for m in file_merges)]
    else:
        merges = _merges_from_vocab(vocab, priority)
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == _UNKNOWN), None)
    backend = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    steps: list[decoders.Decoder] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        # No prefix space: Gemma's text is its own first piece ("Hello" -> "Hello", not "▁Hello").
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    vocab_now = backend.get_vocab()
    _add_special_tokens(backend, meta, tokens, types, keep=lambda t: t in vocab_now)
    return backend


def _merges_from_vocab(vocab: Mapping[str, int], priority: Mapping[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores scores, not merges: every split of a token into two tokens is a merge, ranked by the
    merged token's priority (best first). Same order as transformers' generate_merges, so ids match it."""
    found: list[tuple[str, str, float]] = []
    for token, score in priority.items():
        local = [
            (token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    # Stable sort: equal keys keep the order above (reverse=True keeps stability in Python).
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _add_special_tokens(
    backend: tokenizers.Tokenizer,
    meta: Mapping[str, Any],
    tokens: list[str],
    types: list[int],
    keep: Callable[[str], bool],
) -> None:
    """Control tokens (and the bos/eos/unk/pad the file names) become special: matched whole in text, skipped by
    decode(skip_special_tokens). User-defined tokens (`<think>`) are matched whole but stay text."""
    named = {meta.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                        "padding_token_id")}  # fmt: skip
    special = [
        AddedToken(t, special=True, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
        if (ty in (_CONTROL, _UNKNOWN) or i in named) and keep(t)
    ]
    backend.add_special_tokens(special)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _USER_DEFINED and keep(t)
    ]
    backend.add_tokens(user)


# -- cache ----------------------------------------------------------------------------------------------------


def _gguf_cache_path(path: Path, cache_dir: Path | None) -> Path:
    """Keyed by the file's path, size and mtime (hashing gigabytes of weights would cost more than converting)."""
    root = cache_dir if cache_dir is not None else _default_cache_dir()
    resolved = path.resolve()
    try:
        st = resolved.stat()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None
    key = f"{_CONVERTER_VERSION}\0{resolved}\0{st.st_size}\0{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return root / "tokenizers" / f"{resolved.stem}-{digest}"


def _default_cache_dir() -> Path:
    # Read at call time, not import time, so tests and the CLI can point it elsewhere.
    env = os.environ.get("LLMHOST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmhost"


def _write_cache(
    target: Path,
    backend: tokenizers.Tokenizer,
    tok_cfg: Mapping[str, Any],
    gen_cfg: Mapping[str, Any],
    replace: bool,
) -> None:
    """Write into a temporary directory and rename it into place: the API process and the host core may convert
    the same file at once, and a reader must never see half a cache. replace: the target is unreadable and goes.
    A cache that cannot be written only costs the next load a conversion."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            backend.save(str(tmp / "tokenizer.json"))
            tok_json = json.dumps(tok_cfg, indent=1, ensure_ascii=False) + "\n"
            (tmp / "tokenizer_config.json").write_text(tok_json, encoding="utf-8")
            (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=1) + "\n", encoding="utf-8")
            if replace and target.exists():
                shutil.rmtree(target)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "tokenizer.json").is_file():
                    raise
                # Another process converted the same file first; its copy is as good as ours.
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("cannot cache the converted tokenizer at %s (%s); the next load converts again", target, e)
