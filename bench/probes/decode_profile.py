"""Where a batch-1 decode step spends its time: GPU time per kernel (profiler over the un-captured step) and
graph replay vs host preparation."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from decode import decode_rows, random_model
from shapes import SHAPES
from torch.profiler import ProfilerActivity, profile

from llmhost.engine.decode_runner import DecodeRunner
from llmhost.engine.kv_cache import KVCache

torch.set_grad_enabled(False)
shape = SHAPES["llama-3-8b"]
model = random_model(shape, 2112)
cache = KVCache(shape, 8 * 132 + 1, 16, torch.bfloat16, torch.device("cuda"))
runner = DecodeRunner(model, cache, 8, 2112)
runner.capture()
rows = decode_rows(1, 128, 16, 0)
for _ in range(5):
    runner.run(rows)
torch.cuda.synchronize()
# host prep + replay + argmax/tolist, wall clock
t0 = time.perf_counter()
for _ in range(50):
    runner.run(rows).argmax(-1).tolist()
wall = (time.perf_counter() - t0) / 50
# replay alone, events
g = runner.graphs[1]
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record()
for _ in range(50):
    g.replay()
b.record()
b.synchronize()
replay = a.elapsed_time(b) / 50 / 1e3
print(f"wall per step {wall * 1e3:.3f} ms, graph replay {replay * 1e3:.3f} ms")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    runner._forward(1)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
