"""`llmhost generate`: load one model, complete one prompt, print text as it comes (or JSON with timings)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from rich.console import Console
from rich.progress import Progress

from llmhost.config import ModelConfig, parse_dtype, resolve_path_argument
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.text_stream import stream_text
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import ConfigError
from llmhost.model_files import open_checkpoint


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    return torch.device(spec)


def run_generate(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    path = resolve_path_argument(args.path)
    ckpt = open_checkpoint(path)
    try:
        dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    except ValueError as e:
        raise ConfigError(f"--dtype {args.dtype!r}: {e}") from None
    max_seq_len = min(args.max_seq_len, ckpt.shape.max_position_embeddings)
    config = ModelConfig(name=path.stem, path=path, dtype=dtype, max_seq_len=max_seq_len, max_batch=1)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    ).validate()
    err = Console(stderr=True)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_checkpoint(ckpt)
    with Progress(console=err, transient=True, disable=args.json) as bar:
        task = bar.add_task(f"loading {path.name} to {device}", total=len(ckpt.tensors))
        engine = Engine.load(
            config,
            device,
            checkpoint=ckpt,
            eos_token_ids=tokenizer.eos_token_ids,
            progress=lambda n, total: bar.update(task, completed=n),
        )
    load_s = time.perf_counter() - t0
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)

    t1 = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    tokens: list[int] = []
    reason = None
    for delta in stream_text(engine, tokenizer, prompt_ids, params):
        if first is None:
            first = time.perf_counter()
        if delta.token is not None:
            tokens.append(delta.token.token)
        pieces.append(delta.text)
        if not args.json:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        reason = delta.finish_reason
    end = time.perf_counter()
    if args.json:
        decode_s = end - (first or end)
        doc = {
            "model": str(path),
            "device": str(device),
            "dtype": dtype,
            "text": "".join(pieces),
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(tokens),
            "tokens": tokens,
            "finish_reason": reason,
            "timings": {
                "load_s": round(load_s, 4),
                "time_to_first_token_s": round((first or end) - t1, 4),
                "decode_tokens_per_s": round((len(tokens) - 1) / decode_s, 2) if decode_s > 0 else None,
                "total_s": round(end - t1, 4),
            },
        }
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write("\n")
    return 0
