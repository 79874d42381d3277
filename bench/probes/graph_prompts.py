"""Check, on the GPU: short prompts prefilled as rows of the decode runner's captured graphs
(ModelConfig.graph_prompt_tokens) give the tokens the eager prefill gives. tests/test_graph_prompts.py checks the
same on a CPU, where the runner runs its kernels under Triton's interpreter and captures nothing.

For each shape, one random engine per path with the same weights (the same seed): eight requests of PROMPT tokens,
the later ones arriving while the first decode, greedy. The reference is Engine.generate (each prompt prefilled by
the eager forward, in mixed steps beside the decode rows); the graphed path drives the engine as the host does on
a GPU (a decode step carrying prompts of at most `rows` tokens: Engine.schedule(0, graph_prompts=True); a
prompt-only step when nothing decodes). Reported per shape: how many requests match token for token, how many
match on their first token, and how many steps carried prompts. The float32 tiny model must match exactly; in
bfloat16 the two prefills round differently (different kernels), so a late token may flip where two logits tie.

Usage: python bench/probes/graph_prompts.py [--cpu-smoke]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

import torch
from common import gpu_tag, write_result
from multi_model import TINY
from multi_model_drivers import random_engine
from shapes import SHAPES

from llmhost.config import ModelConfig
from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.model_files.shape import ModelShape

PROMPT = 128
ROWS = 128
REQUESTS = 8
TOKENS = 32
ARRIVALS = (0, 0, 2, 3, 5, 8, 13, 21)  # the step at which each request arrives


def _engine(shape: ModelShape, dtype: str, device: str, graphed: bool) -> Engine:
    config = ModelConfig(
        "probe", Path("/nonexistent"), dtype=dtype, max_seq_len=PROMPT + TOKENS, max_batch=REQUESTS,
        graph_prompt_tokens=ROWS if graphed else 0,
    )  # fmt: skip
    torch.manual_seed(0)
    return random_engine(config, shape, device, REQUESTS * (PROMPT + TOKENS), 16)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (PROMPT,), generator=g).tolist() for _ in range(REQUESTS)]


def _reference(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    ids: list[str] = []
    out: dict[str, list[int]] = {}
    step = 0
    while len(ids) < len(prompts) or eng.has_work:
        while len(ids) < len(prompts) and ARRIVALS[len(ids)] <= step:
            ids.append(eng.add_request(prompts[len(ids)], params))
            out[ids[-1]] = []
        for o in eng.step():
            out[o.seq_id].append(o.token)
        step += 1
    return [out[i] for i in ids]


def _graphed(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], int]:
    ids: list[str] = []
    out: dict[str, list[int]] = {}
    carried = step = 0
    while len(ids) < len(prompts) or eng.has_work:
        while len(ids) < len(prompts) and ARRIVALS[len(ids)] <= step:
            ids.append(eng.add_request(prompts[len(ids)], params))
            out[ids[-1]] = []
        plan = eng.schedule(0, graph_prompts=True)
        carried += plan.graphed
        if plan.empty:
            plan = eng.schedule(None, decodes=False, graph_prompts=True)
        eng.execute(plan)
        for o in eng.collect(plan):
            out[o.seq_id].append(o.token)
        step += 1
    return [out[i] for i in ids], carried


def check(name: str, shape: ModelShape, dtype: str, device: str) -> dict[str, Any]:
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompts = _prompts(shape.vocab_size)
    ref = _reference(_engine(shape, dtype, device, False), prompts, params)
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    ours, carried = _graphed(_engine(shape, dtype, device, True), prompts, params)
    return {
        "model": name,
        "dtype": dtype,
        "requests": REQUESTS,
        "identical": sum(a == b for a, b in zip(ref, ours, strict=True)),
        "first_token_identical": sum(a[:1] == b[:1] for a, b in zip(ref, ours, strict=True)),
        "tokens_identical": sum(x == y for a, b in zip(ref, ours, strict=True) for x, y in zip(a, b, strict=True)),
        "tokens": REQUESTS * TOKENS,
        "steps_carrying_prompts": carried,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny float32 model on the CPU")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    device = "cuda:0" if on_gpu else "cpu"
    runs = [check("tiny", TINY, "float32", device)]
    if on_gpu:
        runs += [check(n, SHAPES[n], "bfloat16", device) for n in ("llama-3.2-1b", "llama-3-8b")]
    doc = {
        "bench": "graph_prompts",
        "what": "short prompts as rows of the decode graphs against the eager prefill: greedy tokens",
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "torch": torch.__version__,
        "runs": runs,
        "command": "python bench/probes/graph_prompts.py" + (" --cpu-smoke" if args.cpu_smoke else ""),
    }
    write_result("graph_prompts", gpu_tag(doc["gpu"]) if on_gpu else "cpu", doc)
    tiny = runs[0]
    if tiny["identical"] != tiny["requests"]:
        sys.exit("the float32 tiny model's tokens differ between the graphed and the eager prefill")


if __name__ == "__main__":
    main()
