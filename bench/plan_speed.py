"""How long the planner takes for a busy machine: 10 Llama-3-8B-shaped models (bf16, max_seq_len 4096,
max_batch 8) on 8 simulated 80 GiB GPUs. Pure CPU arithmetic, no checkpoint is read. Timed twice: from the
estimate alone, and with a measured-memory history (a temporary sqlite file holding a record for every model; a
fresh History per plan, as `llmhost plan` reads it, so the file reads are part of the time).

Usage: python bench/plan_speed.py [--repeats 20]
Prints {"models": 10, "gpus": 8, "median_ms": ..., "median_ms_history": ...} and writes
bench/results/plan_speed-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import write_result

from llmhost.config import HostConfig, ModelConfig
from llmhost.memory.estimate import ModelSpec, whole_need
from llmhost.memory.history import History, Measured, history_key
from llmhost.memory.inventory import parse_gpu_spec
from llmhost.memory.planner import plan_models
from llmhost.model_files.shape import ModelShape

LLAMA3_8B = ModelShape(
    architecture="llama",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    tie_embeddings=False,
    max_position_embeddings=131072,
)
MODELS = 10
GPUS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    specs = [
        ModelSpec.from_shape(ModelConfig(name=f"llama3-8b-{i}", path=Path(f"/models/{i}")), LLAMA3_8B)
        for i in range(MODELS)
    ]
    inventory = parse_gpu_spec(f"{GPUS}x80GiB")
    host = HostConfig()
    plan_models(specs, inventory, host)  # warm-up: imports and first-call costs are not the planner's
    times_ms = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = plan_models(specs, inventory, host)
        times_ms.append((time.perf_counter() - t0) * 1000)
    assert len(plan.models) == MODELS

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.sqlite"
        specs = [replace(s, fingerprint=f"bench-{i}") for i, s in enumerate(specs)]
        for s in specs:
            est = whole_need(s, s.config.max_seq_len * s.config.max_batch, host.block_size)
            key = history_key(s, f"{s.fingerprint}", inventory.devices[0], 0, s.shape.num_layers, host.block_size)
            History(path).record(key, Measured(est.weights, est.kv, est.workspace // 2, est.graphs))
        history_ms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plan = plan_models(specs, inventory, host, History(path))
            history_ms.append((time.perf_counter() - t0) * 1000)
        assert all(st.need.measured for m in plan.models for st in m.stages)
    doc = {
        "models": MODELS,
        "gpus": GPUS,
        "median_ms": round(statistics.median(times_ms), 3),
        "median_ms_history": round(statistics.median(history_ms), 3),
    }
    write_result("plan_speed", "cpu", doc)


if __name__ == "__main__":
    main()
