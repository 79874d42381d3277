"""Check the planner's memory prediction against the driver on a real GPU.

For each shape x config, in a fresh process: read NVML used memory before CUDA starts, plan the model alone on
this GPU, build the engine with random weights at the real shape, run the largest step the estimate assumes (one
sequence prefilled in chunks up to max_seq_len, beside max_batch - 1 decoding sequences, so a full chunk attends
to max_seq_len and max_batch rows sample), then read NVML again. Predicted = runtime overhead + the plan's bytes
for the model; measured = NVML used now - before. Target: |predicted - measured| <= max(2%, 256 MiB).

Usage: python bench/memory_validation.py   (on the GPU machine; writes bench/results/memory_validation-<gpu>.json)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import gpu_tag, write_result

CONFIGS: dict[str, dict[str, int]] = {
    "A": {"max_seq_len": 4096, "max_batch": 8, "prefill_chunk": 512},
    "B": {"max_seq_len": 8192, "max_batch": 16, "prefill_chunk": 1024},
}
MODELS = ("smollm2-135m", "mistral-7b", "llama-3-8b", "qwen2.5-14b")
MiB = 1024**2


def child(model: str, config: str) -> dict[str, Any]:
    import pynvml
    import torch
    from shapes import SHAPES

    from llmhost.config import HostConfig, ModelConfig
    from llmhost.engine.engine import Engine
    from llmhost.engine.kv_cache import KVCache
    from llmhost.engine.model import LlamaModel
    from llmhost.engine.sampling_params import SamplingParams
    from llmhost.memory.estimate import ModelSpec
    from llmhost.memory.inventory import detect_inventory
    from llmhost.memory.planner import plan_models

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    before = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    shape = SHAPES[model]
    # Decode graphs on, as the engine runs on a GPU by default: their buffers and pool are in the prediction.
    cfg = ModelConfig(name=model, path=Path("random"), dtype="bfloat16", cuda_graphs=True, **CONFIGS[config])
    inventory = detect_inventory()
    plan = plan_models([ModelSpec.from_shape(cfg, shape)], inventory, HostConfig())
    mp = plan.models[0]
    (stage,) = mp.stages
    predicted_model = stage.need.total
    predicted = plan.budgets[0].runtime + predicted_model

    device = torch.device("cuda")
    m = LlamaModel(shape, torch.bfloat16, device, cfg.max_seq_len)
    for name, t in m.destinations().items():
        if "norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02)
    cache = KVCache(shape, mp.kv_blocks + 1, plan.block_size, torch.bfloat16, device)  # + the scratch block
    engine = Engine(m, cache, cfg, decode_graphs=True)
    torch.cuda.synchronize()
    after_load = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - before
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, shape.vocab_size, (cfg.max_seq_len - 1,), generator=g).tolist()
    engine.add_request(long_prompt, SamplingParams(max_tokens=1, temperature=0.0))
    for _ in range(cfg.max_batch - 1):
        short = torch.randint(0, shape.vocab_size, (16,), generator=g).tolist()
        engine.add_request(short, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    measured = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - before
    report = engine.memory_report()
    err = predicted - measured
    tolerance = max(int(0.02 * measured), 256 * MiB)
    return {
        "model": model,
        "config": config,
        **CONFIGS[config],
        "kv_tokens": mp.kv_tokens,
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "error_bytes": err,
        "error_pct": round(100 * err / measured, 3),
        "tolerance_bytes": tolerance,
        "within_tolerance": abs(err) <= tolerance,
        "predicted_terms": {
            "runtime": plan.budgets[0].runtime,
            "weights": stage.need.weights,
            "kv": stage.need.kv,
            "workspace": stage.need.workspace,
            "graphs": stage.need.graphs,
        },
        "engine_report": {
            "weights": report.weights,
            "kv": report.kv,
            "workspace": report.workspace,
            "graphs": report.graphs,
        },
        "measured_after_load_bytes": after_load,
        "allocator_peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "allocator_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"))
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = []
    gpu = ""
    for model in args.models.split(","):
        for config in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", model, config], capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                rows.append({"model": model, "config": config, "error": out.stderr[-2000:]})
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{model:14s} {config}: predicted {row['predicted_bytes'] / MiB:9.0f} MiB measured "
                f"{row['measured_bytes'] / MiB:9.0f} MiB error {row['error_pct']:+.2f}% ok={row['within_tolerance']}",
                file=sys.stderr,
                flush=True,
            )
    import pynvml

    pynvml.nvmlInit()
    gpu = str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))
    import torch

    doc = {
        "what": "planner prediction vs driver-level used memory after load and the largest step",
        "gpu": gpu,
        "torch": torch.__version__,
        "rule": "abs(predicted - measured) <= max(2% of measured, 256 MiB)",
        "all_within_tolerance": all(r.get("within_tolerance", False) for r in rows),
        "rows": rows,
        "command": "python bench/memory_validation.py",
    }
    write_result("memory_validation", gpu_tag(gpu), doc)


if __name__ == "__main__":
    main()
