"""One model split across two GPUs, and two models on two GPUs (run on a 2-GPU machine, e.g. 2x H200).

Random weights at real shapes (bench/shapes.py), bf16, initialised in place on each stage's GPU: a Llama-3-70B
checkpoint (141 GB) would not fit the lent machine's disk, and decode speed and memory do not depend on values.
Engine.load's streaming of each tensor onto its stage's GPU is checked by the `parity` part instead, on a small
random checkpoint written to disk. Each part runs in a fresh process, so NVML's "before" sees no CUDA context of
ours; CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's GPU indices NVML's.

Parts:
- split: Llama-3-70B placed by the planner across both GPUs (max_seq_len 4096, max_batch 32). Built, then the
  largest step the estimate assumes runs (one prompt prefilled in chunks up to max_seq_len beside max_batch - 1
  decoding sequences). Per GPU: predicted = runtime overhead + the plan's stage bytes there, measured = NVML used
  now - before; target |predicted - measured| <= 2% of measured. The engine's per-device weights and KV bytes must
  equal the plan's exactly. Then decode through Engine.step (eager: a split model captures no CUDA graphs) at
  batch 1 and 32, prompt 128: tokens/s, step time, effective bandwidth = (weights + KV read) / step time.
- pair: two Llama-3-8B models (CUDA graphs on), placed by the planner one per GPU. Decode tokens/s of each alone,
  of both together (one loop: both steps launched, then both collected, as the host core does), and of two such
  models stacked on GPU 0 (each on its own CUDA stream). Target: together >= 95% of solo for each.
- fit: Llama-3-70B at max_batch 64 with the planner's largest max_seq_len for the split (max_seq_len_fit, bounded
  by memory): the plan at that length must be feasible, build and run its largest step without running out of
  memory, and match the prediction as in `split`; one token more and one block more must be rejected by the
  planner.
- parity: a SmolLM2-135M-shaped random checkpoint loaded through Engine.load split across both GPUs (tied head:
  copied to GPU 1) gives the same greedy tokens as the unsplit eager engine on GPU 0.

Usage (on the 2-GPU machine): python bench/multi_gpu.py [--parts split,pair,fit,parity]
Writes bench/results/multi_gpu-<gpu>.json. `--plan-only [--gpus 2x143771MiB]` prints the planning half (stages,
predicted bytes per GPU, the largest max_seq_len and its rejections) without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import gpu_tag, write_result
from shapes import SHAPES

from llmhost.config import HostConfig, ModelConfig
from llmhost.errors import PlanInfeasibleError
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.inventory import Inventory, detect_inventory, parse_gpu_spec
from llmhost.memory.plan import ModelPlan, Plan
from llmhost.memory.planner import plan_models

if TYPE_CHECKING:  # torch is imported only where a GPU part runs: --plan-only needs none
    from llmhost.engine.engine import Engine
    from llmhost.engine.placement import LayerPlacement

PARTS = ("split", "pair", "fit", "parity")
SPLIT_MODEL = "llama-3-70b"
PAIR_MODEL = "llama-3-8b"
PARITY_MODEL = "smollm2-135m"
SPLIT_LIMITS = {"max_seq_len": 4096, "max_batch": 32, "prefill_chunk": 512}
FIT_LIMITS = {"max_seq_len": 1024, "max_batch": 64, "prefill_chunk": 512}  # max_seq_len: the planner's fit replaces it
PAIR_LIMITS = {"max_seq_len": 2048, "max_batch": 32, "prefill_chunk": 512}
DECODE_BATCHES = (1, 32)
PROMPT = 128
WARM_STEPS = 4
DECODE_STEPS = 64
MEMORY_TOLERANCE = 0.02
PAIR_TOLERANCE = 0.05
SIMULATED_H200_PAIR = "2x143771MiB"  # what NVML reports for an H200 (141 GB)
MiB = 1024**2


def config(model: str, limits: dict[str, int], **kw: Any) -> ModelConfig:
    return ModelConfig(name=model, path=Path("random"), dtype="bfloat16", **{**limits, **kw})


def spec_of(cfg: ModelConfig, shape_name: str) -> ModelSpec:
    return ModelSpec.from_shape(cfg, SHAPES[shape_name])


# -- planning (no GPU) -------------------------------------------------------------------------------------------


def plan_one(cfg: ModelConfig, shape_name: str, inventory: Inventory) -> tuple[Plan, ModelPlan]:
    plan = plan_models([spec_of(cfg, shape_name)], inventory, HostConfig())
    return plan, plan.models[0]


def predicted_per_gpu(plan: Plan) -> dict[int, dict[str, int]]:
    """Per GPU the plan touches: runtime overhead + each term of the stages placed there."""
    out: dict[int, dict[str, int]] = {}
    for b in plan.budgets:
        stages = plan.stages_on(b.device.index)
        if not stages:
            continue
        terms = {k: sum(getattr(s.need, k) for _, s in stages) for k in ("weights", "kv", "workspace", "graphs")}
        out[b.device.index] = {"runtime": b.runtime, **terms, "total": b.runtime + plan.used_on(b.device.index)}
    return out


def stages_doc(mp: ModelPlan) -> list[dict[str, Any]]:
    return [
        {"gpu": s.device, "layers": [s.start, s.end], "weights": s.need.weights, "kv": s.need.kv,
         "workspace": s.need.workspace, "graphs": s.need.graphs}
        for s in mp.stages
    ]  # fmt: skip


def rejected(cfg: ModelConfig, inventory: Inventory) -> dict[str, Any]:
    try:
        plan_one(cfg, SPLIT_MODEL, inventory)
    except PlanInfeasibleError as e:
        return {"max_seq_len": cfg.max_seq_len, "rejected": True, "message": str(e)}
    return {"max_seq_len": cfg.max_seq_len, "rejected": False}


def fit_plan(inventory: Inventory) -> dict[str, Any]:
    """The split model's largest max_seq_len by the planner, the plan at that length, and the plans one token and
    one block beyond it (each must be rejected)."""
    probe = config(SPLIT_MODEL, FIT_LIMITS)
    _, mp = plan_one(probe, SPLIT_MODEL, inventory)
    fit = mp.max_seq_len_fit
    at_fit = replace(probe, max_seq_len=fit)
    doc: dict[str, Any] = {"max_seq_len_fit": fit, "fit_limited_by": mp.fit_limited_by, "probe_stages": stages_doc(mp)}
    try:
        plan, mp_fit = plan_one(at_fit, SPLIT_MODEL, inventory)
        doc |= {"plan_at_fit_feasible": True, "stages": stages_doc(mp_fit), "kv_tokens": mp_fit.kv_tokens}
        doc["free_after_plan"] = {b.device.index: plan.free_on(b.device.index) for b in plan.budgets}
    except PlanInfeasibleError as e:
        doc |= {"plan_at_fit_feasible": False, "message": str(e)}
    block = HostConfig().block_size
    doc["one_token_more"] = rejected(replace(probe, max_seq_len=fit + 1), inventory)
    doc["one_block_more"] = rejected(replace(probe, max_seq_len=fit + block), inventory)
    return doc


def plan_only(gpus: str) -> dict[str, Any]:
    inventory = parse_gpu_spec(gpus)
    plan, mp = plan_one(config(SPLIT_MODEL, SPLIT_LIMITS), SPLIT_MODEL, inventory)
    pair = plan_models(
        [spec_of(config(n, PAIR_LIMITS), PAIR_MODEL) for n in ("a", "b")], inventory, HostConfig()
    )  # fmt: skip
    return {
        "inventory": gpus,
        "split": {"stages": stages_doc(mp), "predicted_per_gpu": predicted_per_gpu(plan)},
        "pair_devices": {m.name: list(m.devices) for m in pair.models},
        "fit": fit_plan(inventory),
    }


# -- on the GPUs -------------------------------------------------------------------------------------------------


def nvml_used() -> list[int]:
    import pynvml

    pynvml.nvmlInit()
    n = pynvml.nvmlDeviceGetCount()
    return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used) for i in range(n)]


def sync_all() -> None:
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def on_gpus(mp: ModelPlan) -> LayerPlacement:
    """The plan's stages of the split model on cuda:<plan index>."""
    from llmhost.engine.placement import LayerPlacement

    devices = {s.device: f"cuda:{s.device}" for s in mp.stages}
    return LayerPlacement.from_plan(mp.stages, devices, SHAPES[SPLIT_MODEL].num_layers)


def build_engine(cfg: ModelConfig, shape_name: str, placement: LayerPlacement, kv_tokens: int, graphs: bool) -> Engine:
    """An engine with random weights at the shape, each layer's weights and KV pool on its stage's GPU."""
    import torch

    from llmhost.engine.block_manager import blocks_for
    from llmhost.engine.engine import Engine
    from llmhost.engine.kv_cache import KVCache
    from llmhost.engine.model import LlamaModel

    shape = SHAPES[shape_name]
    bs = HostConfig().block_size
    model = LlamaModel(shape, torch.bfloat16, placement.first, cfg.max_seq_len, placement)
    for name, t in model.destinations().items():
        t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02)
    caches = [
        KVCache(shape, blocks_for(kv_tokens, bs) + (1 if graphs else 0), bs, torch.bfloat16, st.device, None, st.layers)
        for st in placement.stages
    ]
    return Engine(model, caches, cfg, decode_graphs=graphs)


def largest_step(engine: Engine, seed: int = 0) -> int:
    """One sequence prefilled in chunks up to max_seq_len beside max_batch - 1 decoding ones (the estimate's
    largest step: a full chunk attends to max_seq_len, max_batch rows sample). Returns the steps run."""
    import torch

    from llmhost.engine.sampling_params import SamplingParams

    cfg, vocab = engine.config, engine.model.shape.vocab_size
    g = torch.Generator().manual_seed(seed)
    engine.add_request(
        torch.randint(0, vocab, (cfg.max_seq_len - 1,), generator=g).tolist(), SamplingParams(max_tokens=1)
    )
    for _ in range(cfg.max_batch - 1):
        short = torch.randint(0, vocab, (16,), generator=g).tolist()
        engine.add_request(short, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    sync_all()
    return steps


def memory_rows(plan: Plan, before: list[int], engine: Engine) -> list[dict[str, Any]]:
    """Predicted vs NVML-measured used memory per GPU; the engine's exact weights/KV there vs the plan's."""
    used = nvml_used()
    by_device = engine.memory_by_device()
    rows = []
    for gpu, pred in predicted_per_gpu(plan).items():
        measured = used[gpu] - before[gpu]
        report = by_device[f"cuda:{gpu}"]
        err = pred["total"] - measured
        rows.append({
            "gpu": gpu, "predicted_bytes": pred["total"], "measured_bytes": measured, "error_bytes": err,
            "error_pct": round(100 * err / measured, 3), "within_2pct": abs(err) <= MEMORY_TOLERANCE * measured,
            "predicted_terms": pred,
            "engine": {"weights": report.weights, "kv": report.kv, "workspace": report.workspace,
                       "graphs": report.graphs, "driver_used": report.driver_used},
            "weights_kv_exact": (report.weights, report.kv) == (pred["weights"], pred["kv"]),
        })  # fmt: skip
    return rows


def decode_rates(engines: list[Engine], batch: int, streams: bool) -> list[dict[str, float]]:
    """Decode tokens/s of each engine while all of them step in one loop: every engine's step is launched, then
    every one collected (the host core's order). Prompts of PROMPT tokens, greedy, ignore_eos; timed over
    DECODE_STEPS pure decode steps after WARM_STEPS. streams: each engine on its own CUDA stream (models sharing
    a GPU); collect's sampling waits for it."""
    import torch

    from llmhost.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=WARM_STEPS + DECODE_STEPS + 8, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for e in engines:
        for _ in range(batch):
            e.add_request(torch.randint(0, e.model.shape.vocab_size, (PROMPT,), generator=g).tolist(), params)
    side = [torch.cuda.Stream(e.device) if streams else None for e in engines]  # type: ignore[no-untyped-call]

    def step_all() -> list[int]:
        plans = [e.schedule() for e in engines]
        for e, p, s in zip(engines, plans, side, strict=True):
            e.execute(p, s)
        counts = []
        for e, p, s in zip(engines, plans, side, strict=True):
            if s is not None:
                torch.cuda.current_stream(s.device).wait_stream(s)  # collect's sampling reads the logits
            counts.append(sum(1 for c in p.chunks if len(c.token_ids) == 1))
            e.collect(p)
        return counts

    # Prefill every prompt, then warm up on pure decode steps.
    while any(any(s.num_tokens - s.num_computed > 1 for s in e.seqs.values()) for e in engines):
        step_all()
    for _ in range(WARM_STEPS):
        step_all()
    sync_all()
    t0 = time.perf_counter()
    tokens = [0] * len(engines)
    for _ in range(DECODE_STEPS):
        tokens = [a + b for a, b in zip(tokens, step_all(), strict=True)]
    sync_all()
    elapsed = time.perf_counter() - t0
    for e in engines:
        for seq_id in list(e.seqs):
            e.abort(seq_id)
    return [{"tokens_per_s": round(n / elapsed, 1), "step_ms": round(1e3 * elapsed / DECODE_STEPS, 3)} for n in tokens]


def part_split() -> dict[str, Any]:
    before = nvml_used()
    cfg = config(SPLIT_MODEL, SPLIT_LIMITS)
    plan, mp = plan_one(cfg, SPLIT_MODEL, detect_inventory())
    placement = on_gpus(mp)
    t0 = time.perf_counter()
    engine = build_engine(cfg, SPLIT_MODEL, placement, mp.kv_tokens, graphs=False)
    sync_all()
    build_s = time.perf_counter() - t0
    steps = largest_step(engine)
    memory = memory_rows(plan, before, engine)
    shape = SHAPES[SPLIT_MODEL]
    weight_bytes = sum(s.need.weights for s in mp.stages)
    decode = []
    for b in DECODE_BATCHES:
        (r,) = decode_rates([engine], b, streams=False)
        step_s = r["step_ms"] / 1e3
        read = weight_bytes + b * (PROMPT + WARM_STEPS + DECODE_STEPS // 2) * shape.kv_bytes_per_token(2)
        decode.append({"batch": b, "prompt": PROMPT, **r, "effective_bandwidth_GBps": round(read / step_s / 1e9, 1)})
    return {
        "model": SPLIT_MODEL, **SPLIT_LIMITS, "kv_tokens": mp.kv_tokens, "stages": stages_doc(mp),
        "build_s": round(build_s, 2), "largest_step_steps": steps, "memory": memory,
        "all_within_2pct": all(r["within_2pct"] for r in memory), "decode_graphs": False,
        "decode": decode,
    }  # fmt: skip


def part_pair() -> dict[str, Any]:
    from llmhost.engine.placement import LayerPlacement

    cfgs = [config(n, PAIR_LIMITS) for n in ("a", "b")]
    plan = plan_models([spec_of(c, PAIR_MODEL) for c in cfgs], detect_inventory(), HostConfig())
    n = SHAPES[PAIR_MODEL].num_layers
    engines = []
    for cfg in cfgs:
        mp = next(m for m in plan.models if m.name == cfg.name)
        (st,) = mp.stages
        own = LayerPlacement.single(f"cuda:{st.device}", n)
        engines.append(build_engine(cfg, PAIR_MODEL, own, mp.kv_tokens, graphs=True))
    devices = [str(e.device) for e in engines]
    on_first = LayerPlacement.single(engines[0].device, n)
    stacked = build_engine(config("c", PAIR_LIMITS), PAIR_MODEL, on_first, plan.models[0].kv_tokens, True)
    rows = []
    for b in DECODE_BATCHES:
        solo = [decode_rates([e], b, streams=True)[0] for e in engines]
        together = decode_rates(engines, b, streams=True)
        solo_c = decode_rates([stacked], b, streams=True)[0]
        on_one = decode_rates([engines[0], stacked], b, streams=True)
        ratios = [t["tokens_per_s"] / s["tokens_per_s"] for t, s in zip(together, solo, strict=True)]
        rows.append({
            "batch": b, "solo": solo, "together_two_gpus": together,
            "together_over_solo": [round(r, 3) for r in ratios],
            "within_5pct": all(r >= 1 - PAIR_TOLERANCE for r in ratios),
            "stacked_solo": solo_c, "stacked_one_gpu": on_one,
            "stacked_over_solo": [round(on_one[0]["tokens_per_s"] / solo[0]["tokens_per_s"], 3),
                                  round(on_one[1]["tokens_per_s"] / solo_c["tokens_per_s"], 3)],
        })  # fmt: skip
    return {"model": PAIR_MODEL, **PAIR_LIMITS, "devices": devices, "stacked_on": devices[0], "rows": rows}


def part_fit() -> dict[str, Any]:
    import torch

    before = nvml_used()
    inventory = detect_inventory()
    doc = fit_plan(inventory)
    if not doc.get("plan_at_fit_feasible"):
        return doc
    cfg = config(SPLIT_MODEL, FIT_LIMITS, max_seq_len=doc["max_seq_len_fit"])
    plan, mp = plan_one(cfg, SPLIT_MODEL, inventory)
    placement = on_gpus(mp)
    try:
        engine = build_engine(cfg, SPLIT_MODEL, placement, mp.kv_tokens, graphs=False)
        doc["largest_step_steps"] = largest_step(engine)
        doc["loaded"] = True
    except torch.OutOfMemoryError as e:
        doc |= {"loaded": False, "error": str(e)[:500]}
        return doc
    doc["memory"] = memory_rows(plan, before, engine)
    doc["all_within_2pct"] = all(r["within_2pct"] for r in doc["memory"])
    return doc


def part_parity() -> dict[str, Any]:
    import torch
    from random_checkpoint import random_checkpoint

    from llmhost.engine.engine import Engine
    from llmhost.engine.sampling_params import SamplingParams

    directory = random_checkpoint(PARITY_MODEL, Path(tempfile.gettempdir()) / "llmhost-bench" / PARITY_MODEL)
    n = SHAPES[PARITY_MODEL].num_layers
    # Eager both ways (no decode graphs): the same kernels on the same GPU kind, so the tokens must be identical.
    cfg = ModelConfig(PARITY_MODEL, directory, dtype="bfloat16", max_seq_len=512, max_batch=4, cuda_graphs=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (k,), generator=g).tolist() for k in (7, 64, 130, 300)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    whole = Engine.load(cfg, "cuda:0")
    want = [c.output_ids for c in whole.generate(prompts, params)]
    del whole
    split = Engine.load(cfg, stages=[("cuda:0", 0, n // 2), ("cuda:1", n // 2, n)])
    got = [c.output_ids for c in split.generate(prompts, params)]
    return {
        "model": PARITY_MODEL, "stages": [[0, n // 2], [n // 2, n]], "tied_head_on": str(split.model.lm_head.device),
        "identical_tokens": got == want, "tokens_compared": sum(len(t) for t in want),
        "weights_by_device": {d: r.weights for d, r in split.memory_by_device().items()},
    }  # fmt: skip


CHILDREN = {"split": part_split, "pair": part_pair, "fit": part_fit, "parity": part_parity}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--child", choices=PARTS)
    ap.add_argument("--plan-only", action="store_true", help="print the planning half; needs no GPU")
    ap.add_argument("--gpus", default=SIMULATED_H200_PAIR, help="simulated inventory for --plan-only")
    args = ap.parse_args()
    if args.plan_only:
        print(json.dumps(plan_only(args.gpus), indent=2))
        return
    if args.child:
        print(json.dumps(CHILDREN[args.child]()))
        return
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # CUDA's GPU indices = NVML's
    results: dict[str, Any] = {}
    for part in args.parts.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--child", part], capture_output=True, text=True, check=False, env=env
        )
        if out.returncode != 0:
            results[part] = {"error": out.stderr[-3000:]}
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        results[part] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{part}: done", file=sys.stderr, flush=True)
    import pynvml
    import torch

    pynvml.nvmlInit()
    gpu = str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))
    doc = {
        "what": "one model split across two GPUs (memory, decode speed, largest context) and two models on two GPUs",
        "gpu": gpu,
        "gpus": pynvml.nvmlDeviceGetCount(),
        "torch": torch.__version__,
        "weights": "random, bf16, initialised in place on each stage's GPU (parity: Engine.load from disk)",
        "rules": {
            "memory": "abs(predicted - measured) <= 2% of measured, per GPU",
            "pair": "each model's tokens/s with both decoding on their own GPUs >= 95% of its solo tokens/s",
        },
        **results,
        "command": "python bench/multi_gpu.py",
    }
    write_result("multi_gpu", gpu_tag(gpu), doc)


if __name__ == "__main__":
    main()
