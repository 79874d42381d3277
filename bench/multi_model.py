"""Several models on one GPU through the host, against baselines with the same engine, measured in one run (issue 6).

Random weights at real shapes, bf16 (speed and memory do not depend on the values):
1. pair: Mistral-7B + Qwen2.5-14B (on a GPU of 120 GiB or more, the H200: Mistral-7B + Yi-34B), one batch-1 stream
   each. Through the in-process host: each alone (the other loaded, idle), then together with weights 1:1, 3:1 and
   1:3 (the small model : the large), and 1:1 with [host] sm_steering off. Baselines driving the same Engine
   with engine.step() loops: two threads in one process (the report's pattern; each on its own CUDA stream), two
   processes (time-sliced), two processes under CUDA MPS. Per model: tok/s, normalized speed (together / alone),
   GPU-time shares (the host scheduler's charged seconds); both models: effective bandwidth (per token, the
   weights plus the KV of every earlier position, read once) against the copy bandwidth measured in the run.
2. four: Llama-3.2-1B, Llama-3.2-3B and two Llama-3-8B, eight concurrent clients each: aggregate tok/s through the
   host against the best baseline (threads, processes, MPS; eight sequences per engine), and each model's p99
   inter-token latency together against its own alone in the host; the host again with [host] sm_steering off.
3. swap: three Qwen2.5-14B (two fit on the 80 GB GPU), requests alternating between them one after the other,
   then a burst of concurrent ones: host-to-device copy GB/s (parking.unpark's own timing), the whole swap-in
   (the coordinator's, with allocation and the decode runner), the swapped request's time to first token (with
   the other model's park), failed requests.
Memory: every reconciliation of the ledger with the driver right after a load or swap-in, in every host phase.

Each phase runs in its own process (a clean CUDA context: the ledger's runtime term and the driver agree); MPS
phases run last, with the daemon started by this script. Targets are judged in the JSON, met or not.

Usage: python bench/multi_model.py [--quick]   (--quick: small shapes and short windows, to check the script;
       --cpu-smoke: tiny float32 models on the CPU, no MPS, no parking). Writes bench/results/multi_model-<gpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import SHAPES

from llmhost.config import DEFAULT_GRAPH_PROMPT_TOKENS, HostConfig, ModelConfig
from llmhost.model_files.shape import ModelShape

GiB = 1024**3
TINY = ModelShape("llama", 2, 64, 4, 2, 16, 128, 512, False, 4096)


@dataclass(frozen=True)
class Mode:
    name: str  # full, quick, cpu-smoke
    device: str
    dtype: str
    pair: tuple[str, str]
    four: tuple[str, ...]
    swap: str
    warm_s: float
    window_s: float
    pair_tokens: int  # max_tokens of a pair stream (prompt 128)
    four_tokens: int
    swap_requests: int

    def shape(self, name: str) -> ModelShape:
        return TINY if self.name == "cpu-smoke" else SHAPES[name]


MODES = {
    "full": Mode("full", "cuda:0", "bfloat16", ("mistral-7b", "qwen2.5-14b"),
                 ("llama-3.2-1b", "llama-3.2-3b", "llama-3-8b", "llama-3-8b"), "qwen2.5-14b",
                 1.0, 4.0, 1024, 256, 9),
    "quick": Mode("quick", "cuda:0", "bfloat16", ("llama-3.2-1b", "llama-3.2-3b"),
                  ("smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.2-3b"), "llama-3.2-3b",
                  0.5, 1.5, 256, 64, 6),
    "cpu-smoke": Mode("cpu-smoke", "cpu", "float32", ("a", "b"), ("a", "b", "c", "d"), "s", 0.3, 1.0, 64, 32, 4),
}  # fmt: skip
PROMPT = 128
FOUR_CLIENTS = 8
FAR_PROMPT_SMS = 44  # four-far: a third of an H100's or H200's SMs, apart from the steering levels of 88 SMs and below
# four-...-smallfirst: weights of the four models (1B, 3B, 8B, 8B) that give the two small ones a quarter more GPU
# time than the 8Bs. At equal weights every model's normalized speed is about 0.33, so a small model's mean token
# gap is already 3x its solo mean, and its p99 (1.05-1.1x its mean alone) cannot be within 3x its solo p99
# (bench/probes/itl_budget.py): this experiment measures what moving share from the 8Bs to them does to each p99.
SMALL_FIRST_WEIGHTS = (1.25, 1.25, 1.0, 1.0)
# Every model's prompts of up to this many tokens ride its decode steps as rows of their graphs
# (ModelConfig.graph_prompt_tokens, the default): the bench's prompts are PROMPT tokens. four-eagerprompt: 0.
GRAPH_PROMPT_TOKENS = DEFAULT_GRAPH_PROMPT_TOKENS
assert PROMPT <= GRAPH_PROMPT_TOKENS
PAIR_WEIGHTS = {"pair": (1.0, 1.0), "pair-3:1": (3.0, 1.0), "pair-1:3": (1.0, 3.0), "pair-unsteered": (1.0, 1.0),
                "pair-undithered": (1.0, 1.0), "pair-collected": (1.0, 1.0), "pair-lead2": (1.0, 1.0),
                "pair-lead2-ditherall": (1.0, 1.0), "pair-deep": (1.0, 1.0), "pair-shallow": (1.0, 1.0),
                "pair-minheld3": (1.0, 1.0), "pair-lead1": (1.0, 1.0),
                "pair-settle": (1.0, 1.0), "pair-oneprompt": (1.0, 1.0),
                "pair-deeper": (1.0, 1.0)}  # fmt: skip
LARGE_PAIR = ("mistral-7b", "yi-34b")  # the report's pair (issue 6), on a GPU that holds both with room: the H200
LARGE_GPU = 120 * GiB
SWAP_TOKENS = 32
PARK_RAM = 90 * GiB
REQUEST_TIMEOUT_S = 60.0  # one swap-phase request, swaps included
PHASE_TIMEOUT_S = {"full": 240.0, "quick": 150.0, "cpu-smoke": 150.0}


def for_gpu(mode: Mode) -> Mode:
    """The full run's pair on a GPU of LARGE_GPU or more is the report's Mistral-7B + Yi-34B (issue 6: "on H200
    when lent"); the 80 GB H100 runs Mistral-7B + Qwen2.5-14B. Parent and phase processes decide alike (NVML)."""
    total = gpu_total()
    if mode.name == "full" and total is not None and total >= LARGE_GPU:
        return replace(mode, pair=LARGE_PAIR)
    return mode


def names(models: tuple[str, ...]) -> list[str]:
    """Config names: the shape's, with a suffix where a shape repeats."""
    out = []
    for i, m in enumerate(models):
        out.append(f"{m}-{models[:i].count(m) + 1}" if models.count(m) > 1 else m)
    return out


def model_config(mode: Mode, name: str, max_tokens: int, batch: int, **kw: Any) -> ModelConfig:
    return ModelConfig(name, Path("random"), dtype=mode.dtype, max_seq_len=PROMPT + max_tokens, max_batch=batch, **kw)


def weight_bytes(mode: Mode, shape: ModelShape) -> int:
    per = 2 if mode.dtype != "float32" else 4
    return (shape.embed_params() + shape.num_layers * shape.layer_params() + shape.head_params()) * per


def kv_per_token(mode: Mode, shape: ModelShape) -> int:
    return shape.kv_bytes_per_token(2 if mode.dtype != "float32" else 4)


# -- phases (each in its own process) -----------------------------------------------------------------------------


def _loads(mode: Mode, models: tuple[str, ...], seqs: int, max_tokens: int) -> list[Any]:
    from multi_model_drivers import Load

    return [
        Load(n, seqs, PROMPT, max_tokens, mode.shape(m).vocab_size) for n, m in zip(names(models), models, strict=True)
    ]


def _engine_specs(mode: Mode, models: tuple[str, ...], max_tokens: int, batch: int) -> list[Any]:
    from llmhost.memory.estimate import default_kv_tokens

    out = []
    for n, m in zip(names(models), models, strict=True):
        cfg = model_config(mode, n, max_tokens, batch)
        out.append((cfg, mode.shape(m), mode.device, default_kv_tokens(cfg), 16))
    return out


def _per_model(mode: Mode, models: tuple[str, ...], streams: list[Any], t0: float, t1: float, rows: int) -> dict:
    """Per model stream_stats; `rows`: the most rows one step decodes (1: the pair's bytes read are exact; the
    four's FOUR_CLIENTS: a lower bound on them)."""
    out = {}
    for n, m in zip(names(models), models, strict=True):
        shape = mode.shape(m)
        mine = [s for s in streams if s.model == n]
        out[n] = drivers().stream_stats(mine, t0, t1, weight_bytes(mode, shape), kv_per_token(mode, shape), rows)
    return out


def drivers() -> Any:
    import multi_model_drivers

    return multi_model_drivers


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def phase_baseline(mode: Mode, scenario: str) -> dict[str, Any]:
    """Engines in this process: (pair) the copy bandwidth and each engine alone, then one thread per engine."""
    import torch

    d = drivers()
    models = mode.pair if scenario == "pair" else mode.four
    seqs, tokens = (1, mode.pair_tokens) if scenario == "pair" else (FOUR_CLIENTS, mode.four_tokens)
    out: dict[str, Any] = {}
    if scenario == "pair" and mode.device.startswith("cuda"):
        from decode import copy_bandwidth

        out["copy_bandwidth_GBps"] = round(copy_bandwidth() / 1e9, 1)
        _free()
    loads = _loads(mode, models, seqs, tokens)
    engines = [d.random_engine(*spec) for spec in _engine_specs(mode, models, tokens, seqs)]
    for e, load in zip(engines, loads, strict=True):
        d.warm_engine(e, load)
    span = mode.warm_s + mode.window_s
    if scenario == "pair":
        out["alone"] = {}
        for e, load, m in zip(engines, loads, models, strict=True):
            t_start = time.monotonic() + 0.1
            streams = d.drive_engine(e, load, t_start + span, seed=1)
            out["alone"].update(_per_model(mode, (m,), streams, t_start + mode.warm_s, t_start + span, seqs))
    t_start = time.monotonic() + 0.2
    streams = d.drive_threads(engines, loads, t_start, t_start + span)
    out["threads"] = _per_model(mode, models, streams, t_start + mode.warm_s, t_start + span, seqs)
    del engines
    _free()
    if torch.cuda.is_available():
        out["torch"] = torch.__version__
        out["gpu"] = torch.cuda.get_device_name()
    return out


def phase_processes(mode: Mode, scenario: str) -> dict[str, Any]:
    models = mode.pair if scenario == "pair" else mode.four
    seqs, tokens = (1, mode.pair_tokens) if scenario == "pair" else (FOUR_CLIENTS, mode.four_tokens)
    streams, t0, t1 = drivers().drive_processes(
        _engine_specs(mode, models, tokens, seqs), _loads(mode, models, seqs, tokens), mode.warm_s, mode.window_s
    )
    return {"processes": _per_model(mode, models, streams, t0, t1, seqs)}


def _raw_dir(scenario: str) -> Path | None:
    """With --trace-dir: this phase's folder, and the host started next traces its steps into it (written when it
    stops; LLMHOST_STEP_TRACE, inherited by the host process)."""
    from llmhost.host.step_trace import ENV

    root = os.environ.get(TRACE_DIR_ENV)
    if not root:
        return None
    raw = Path(root) / scenario
    raw.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(raw / "steps.jsonl")
    return raw


def canary_beside(raw: Path | None) -> Any:
    """With --trace-dir, a canary process beside the window (bench/probes/canary.py): the machine's own hiccups,
    to line up with the host's step trace."""
    return _probe("canary").Canary(raw / "canary.json") if raw is not None else contextlib.nullcontext()


def _probe(name: str) -> Any:
    """A module of bench/probes/ (imported when first asked for: the phases that need none never load them)."""
    probes = str(Path(__file__).resolve().parent / "probes")
    if probes not in sys.path:
        sys.path.insert(0, probes)
    return importlib.import_module(name)


def _host_window(
    run: Any, mode: Mode, loads: list[Any], models: tuple[str, ...], rows: int, raw: Path | None = None
) -> dict[str, Any]:
    """Drive the host with `loads` for warm + window seconds; stats in the window and the scheduler's charged GPU
    seconds over it (overlapped steps at their solo cost: host/gpu_scheduler.py). `raw`: where to write every
    client stream's token times and the window (tokens.json, as bench/probes/host_trace.py --raw does), and a
    canary's record (canary.json: bench/probes/canary.py)."""
    t_start = time.monotonic()
    t0, t1 = t_start + mode.warm_s, t_start + mode.warm_s + mode.window_s
    charged: dict[str, dict[str, float]] = {}
    driven = [ld.model for ld in loads]

    async def snap(key: str) -> None:
        reply = await run.client.query()
        charged[key] = {m.name: m.gpu_seconds for m in reply.models if m.name in driven}

    with drivers().GcPauses() as pauses, canary_beside(raw):
        streams = d_host(run, loads, t1, at=[(t0, lambda: snap("t0")), (t1 - 1e-3, lambda: snap("t1"))])
    stats = _per_model(mode, models, [s for s in streams if s.model in driven], t0, t1, rows)
    stats = {n: v for n, v in stats.items() if n in driven}
    stats["client_gc"] = pauses.stats(t0, t1)
    if raw is not None:
        drivers().write_tokens(raw / "tokens.json", streams, t0, t1)
    if "t0" in charged and "t1" in charged:
        used = {n: charged["t1"][n] - charged["t0"][n] for n in driven}
        total = sum(used.values())
        for n in driven:
            stats[n]["charged_gpu_s"] = round(used[n], 3)
            stats[n]["gpu_share"] = round(used[n] / total, 4) if total > 0 else None
    stats["failed_requests"] = sum(1 for s in streams if s.failed)
    return stats


def d_host(run: Any, loads: list[Any], t_end: float, **kw: Any) -> list[Any]:
    return drivers().drive_host(run, loads, t_end, **kw)


def _host_models(
    mode: Mode, models: tuple[str, ...], tokens: int, batch: int, weights: tuple[float, ...], **kw: Any
) -> list:
    return [
        (model_config(mode, n, tokens, batch, weight=w, keep_alive_s=-1, **kw), mode.shape(m))
        for n, m, w in zip(names(models), models, weights, strict=True)
    ]


def drive_four(
    mode: Mode,
    label: str,
    in_process: bool,
    warm_s: float | None = None,
    on_window: Callable[[], Any] | None = None,
    host: HostConfig | None = None,
) -> tuple[list[Any], float, float]:
    """For the probes (bench/probes/): the "four" scenario through the host alone (`host`: its settings, default
    HostConfig()), each model first warmed alone for 1 s (graphs, kernels for prefill shapes), then all together
    for `warm_s` (default the mode's) and the window; `on_window` runs when the window starts. Returns every client
    stream and the window (t0, t1)."""
    from llmhost.memory.inventory import detect_inventory

    d = drivers()
    inventory = detect_inventory()
    loads = _loads(mode, mode.four, FOUR_CLIENTS, mode.four_tokens)
    models = _host_models(mode, mode.four, mode.four_tokens, FOUR_CLIENTS, (1.0,) * len(mode.four))
    run = d.start_host(inventory, host or HostConfig(), models, label, in_process=in_process)
    for ld in loads:
        d.drive_host(run, [ld], time.monotonic() + 1.0)
    t0 = time.monotonic() + (mode.warm_s if warm_s is None else warm_s)
    t1 = t0 + mode.window_s
    streams = d.drive_host(run, loads, t1, at=[(t0, on_window)] if on_window is not None else ())
    d.stop_host(run)
    return streams, t0, t1


def _switch_experiments(scenario: str) -> None:
    """Set the host's experiment switches that `scenario` names (its parts after the first "-"), for the host
    process started next: it inherits this phase's environment."""
    from llmhost.host.core import (
        DEEP_LEVELS_ENV,
        DITHER_ALL_ENV,
        FAR_PROMPT_ENV,
        LEAD_STEPS_ENV,
        ONE_PROMPT_ENV,
        PROMPT_APART_ENV,
        SEND_EARLY_ENV,
        SM_DEEPER_ENV,
        SM_DITHER_ENV,
        SM_MIN_HELD_ENV,
        SM_SETTLE_ENV,
        SOLO_RUN_AHEAD_ENV,
    )

    far = (FAR_PROMPT_ENV, str(FAR_PROMPT_SMS))
    switches = {
        "far": [far],
        "lead2": [(LEAD_STEPS_ENV, "2")],  # the default since multi_model_lead_default-h100.json, as ditherall
        "lead1": [(LEAD_STEPS_ENV, "1"), (DITHER_ALL_ENV, "0")],  # comparison: the strict lead, steered dithering
        "lead3": [(LEAD_STEPS_ENV, "3")],
        "ditherall": [(DITHER_ALL_ENV, "1")],
        "deep": [(DEEP_LEVELS_ENV, "1")],  # the default since multi_model_deep_call1/2-h100.json
        "shallow": [(DEEP_LEVELS_ENV, "0")],
        "minheld3": [(SM_MIN_HELD_ENV, "0.03")],
        "minheld2": [(SM_MIN_HELD_ENV, "0.02")],
        "settle": [(SM_SETTLE_ENV, "1")],  # experiment: steering windows of 0.15 s while settling
        "deeper": [(SM_DEEPER_ENV, "1")],  # experiment: steering levels down to 56 of 132 SMs
        "oneprompt": [(ONE_PROMPT_ENV, "1")],  # experiment: one model's prompt work at a time, in turns
        "undithered": [(SM_DITHER_ENV, "0")],
        "collected": [(SOLO_RUN_AHEAD_ENV, "0")],
        "sendearly": [(SEND_EARLY_ENV, "1")],  # the default since multi_model_graph_prompts_call*-h100.json
        "sendlate": [(SEND_EARLY_ENV, "0")],
        "apart": [far, (PROMPT_APART_ENV, "1")],  # prompts on the far SMs, decode steps beside them on the near
    }
    for part in scenario.split("-")[1:]:
        for env, value in switches.get(part, []):
            os.environ[env] = value


def phase_host(mode: Mode, scenario: str) -> dict[str, Any]:
    """The host in its own process, as the server runs it (this process's client threads take no GIL time from its
    loop): (pair) each model alone, then together at weights 1:1; (pair-3:1, pair-1:3) together at those weights
    (small:large), each host in a fresh process; (pair-unsteered) 1:1 with [host] sm_steering off; (four) each
    model alone, then all together; (four-unsteered) the same with sm_steering off; (four-far, four-unsteered-far)
    those two with the host's prompt steps beside other models on FAR_PROMPT_SMS SMs at the far end of the GPU
    (the host's LLMHOST_FAR_PROMPT_SMS experiment; this phase's process only); (four-lead2, four-far-lead2) a lead
    of two steps past another model's bound (LLMHOST_LEAD_STEPS), without and with the far prompts; (pair-lead2,
    four-lead3) leads of two and three steps; (pair-lead2-ditherall, four-lead2-ditherall) a lead of two steps and
    every model dithered (LLMHOST_DITHER_ALL=1); (pair-deep, four-deep, four-lead2-ditherall-deep) SM steering's
    levels below 88 of 132 SMs (LLMHOST_SM_DEEP_LEVELS=1, the default since), alone and with those two;
    (pair-shallow, four-shallow) without them (LLMHOST_SM_DEEP_LEVELS=0);
    (pair-undithered, four-undithered) steered models' decode steps kept at their level (LLMHOST_SM_DITHER=0);
    (pair-collected, four-collected) solo step costs sampled only from decode steps launched after a collection
    (LLMHOST_SOLO_RUN_AHEAD=0, the default before bench/results/multi_model_b2b_reruns-h100.json); (four-sendearly)
    each loop pass's tokens sent before its launches (LLMHOST_SEND_BEFORE_LAUNCH=1); (four-apart) prompt steps on
    the far SMs and every decode step launched beside one confined to the near SMs (LLMHOST_PROMPT_APART=1);
    (four-sendearly-smallfirst) sendearly at SMALL_FIRST_WEIGHTS; (four-graphprompt, four-sendearly-graphprompt)
    short prompts prefilled as rows of the decode graphs (graph_prompt_tokens = GRAPH_PROMPT_TOKENS), and with them
    sendearly (both the defaults since: these phases are the default host now); (four-sendlate) tokens sent after
    the pass's launches (LLMHOST_SEND_BEFORE_LAUNCH=0); (four-eagerprompt) every prompt by eager prompt steps
    (graph_prompt_tokens 0); (four-graph64) graph_prompt_tokens 64: the bench's 128-token prompts (and a 1B's
    pair of them) go back to eager prompt steps; only prefix-matched remainders of 64 tokens or fewer ride;
    (pair-lead1, four-lead1) the strict lead of one step and only steered models dithered (LLMHOST_LEAD_STEPS=1,
    LLMHOST_DITHER_ALL=0: the defaults before multi_model_lead_default-h100.json); (four-minheld3, four-minheld2,
    pair-minheld3) a model moves an SM level when held 3% (2%) of a steering
    window, not 5% (LLMHOST_SM_MIN_HELD); (four-spread2, four-spread4) each carried prompt spread over two (four)
    decode steps (graph_prompt_chunk 64, 32): each step lengthened less by its prompt rows, the tail of the small
    models' token gaps; (pair-settle, four-settle) SM steering's windows 0.15 s long while it settles
    (LLMHOST_SM_SETTLE=1; four-slowsettle in earlier results is today's default, measured while settling was);
    (pair-oneprompt, four-oneprompt) one model's prompt tokens
    at a time on the GPU, in turns (LLMHOST_ONE_PROMPT=1; host/prompt_turns.py); (pair-deeper, four-deeper) SM
    steering's levels down to 56 of 132 SMs (LLMHOST_SM_DEEPER=1)."""
    from llmhost.memory.inventory import detect_inventory

    d = drivers()
    inventory = detect_inventory()  # before this process touches CUDA: its context is the runtime term
    out: dict[str, Any] = {"reconciliations": []}
    if scenario.startswith("pair"):
        w = PAIR_WEIGHTS[scenario]
        loads = _loads(mode, mode.pair, 1, mode.pair_tokens)
        models = _host_models(mode, mode.pair, mode.pair_tokens, 1, w)
        # pair-unsteered: weights 1:1 with every decode graph on the whole GPU (the default steers SMs).
        host = HostConfig(sm_steering=scenario != "pair-unsteered")
        _switch_experiments(scenario)
        run = d.start_host(inventory, host, models, f"{scenario} host {w[0]:g}:{w[1]:g}", in_process=False)
        if scenario == "pair":
            out["alone"] = {}
            for ld in loads:
                out["alone"].update(_host_window(run, mode, [ld], mode.pair, 1))
                out["alone"].pop("failed_requests")
                out["alone"].pop("client_gc")
        out[f"together_{w[0]:g}_{w[1]:g}"] = _host_window(run, mode, loads, mode.pair, 1)
        out["reconciliations"] += run.reconciliations
        d.stop_host(run)
    else:
        loads = _loads(mode, mode.four, FOUR_CLIENTS, mode.four_tokens)
        parts = scenario.split("-")[1:]
        weights = SMALL_FIRST_WEIGHTS if "smallfirst" in parts else (1.0,) * len(mode.four)
        rows = 0 if "eagerprompt" in parts else 64 if "graph64" in parts else GRAPH_PROMPT_TOKENS
        spread = next((int(p.removeprefix("spread")) for p in parts if p.startswith("spread")), 1)
        models = _host_models(
            mode,
            mode.four,
            mode.four_tokens,
            FOUR_CLIENTS,
            weights,
            graph_prompt_tokens=rows,
            graph_prompt_chunk=-(-rows // spread) if spread > 1 else None,
        )
        host = HostConfig(sm_steering="unsteered" not in parts)
        _switch_experiments(scenario)
        raw = _raw_dir(scenario)
        run = d.start_host(inventory, host, models, f"{scenario} host", in_process=False)
        out["alone"] = {}
        for ld in loads:
            window = _host_window(run, mode, [ld], mode.four, FOUR_CLIENTS)
            out["alone_failed_requests"] = out.get("alone_failed_requests", 0) + window.pop("failed_requests")
            out.setdefault("alone_client_gc", {})[ld.model] = window.pop("client_gc")
            out["alone"].update(window)
        out["together"] = _host_window(run, mode, loads, mode.four, FOUR_CLIENTS, raw)
        out["reconciliations"] += run.reconciliations
        d.stop_host(run)  # the host writes its step trace as it stops
        if raw is not None:
            out["trace"] = _trace_summary(raw)
    return out


def _trace_summary(raw: Path) -> dict[str, Any]:
    """With --trace-dir: the gist of bench/probes/loop_passes.py over the phase's folder, kept in the result so that
    it comes back with the JSON even where the folder does not (run the probe on the folder for all of it)."""
    loop_passes = _probe("loop_passes")
    try:
        full = loop_passes.analyse(raw)
    except (OSError, ValueError, KeyError) as e:  # no trace written (a host stopped by force), or a torn one
        return {"error": f"{type(e).__name__}: {e}"}
    moments = full["slow_moments"]
    os_sums = {k: round(sum(m.get("slow_pass_os", {}).get(k, 0) for m in moments), 3) for k in loop_passes.OS_FIELDS}
    return {
        "probe": f"python bench/probes/loop_passes.py {raw}",
        "launch_ms": full["launch_ms"],
        "slow_moments": len(moments),
        "slow_moment_share": full["slow_moment_share"],
        "slow_moment_launch_ms_p50": [m["decode_launch_ms_p50"] for m in moments],
        "slow_moment_os": os_sums if any("slow_pass_os" in m for m in moments) else None,
        "slow_moment_container_throttled_ms": [m.get("container_throttled_ms") for m in moments],
        "slow_moment_canary_late_naps": [m.get("canary_late_naps") for m in moments],
        "canary": full["canary"],
        "models": {
            name: {
                "top_gaps": m["top_gaps"],
                "wait_for_send_ms": m.get("after_collect_ms", {}).get("wait_for_send"),
                "itl_ms": m.get("itl_ms"),
            }
            for name, m in full["models"].items()
        },
    }


def _swap_reserve(mode: Mode, inventory: Any, config: ModelConfig) -> int:
    """Bytes to keep free so that two models fit and three do not (the 80 GB GPU needs none for three 14Bs)."""
    from llmhost.memory.estimate import ModelSpec
    from llmhost.memory.planner import plan_models

    plan = plan_models([ModelSpec.from_shape(config, mode.shape(mode.swap))], inventory, HostConfig())
    one = plan.models[0].stages[0].need.total
    dev, runtime = inventory.devices[0], plan.budgets[0].runtime
    usable = dev.total - dev.external - runtime
    return 0 if usable < 3 * one else int(usable - 2.5 * one)


def _failed(stream: Any, tokens: int) -> str:
    """Why a request failed: the host's answer, or too few tokens before the deadline."""
    if stream.failed or len(stream.times) == tokens:
        return str(stream.failed)
    return f"incomplete: {len(stream.times)} of {tokens} tokens in {REQUEST_TIMEOUT_S:.0f} s"


def phase_swap(mode: Mode, scenario: str) -> dict[str, Any]:
    """Three models of which two fit: requests alternating between them one after the other, then a burst of
    concurrent ones (each model's client sends two); every request must complete."""
    from llmhost.memory.inventory import detect_inventory, host_memory

    d = drivers()
    inventory = detect_inventory()
    shape = mode.shape(mode.swap)
    configs = [model_config(mode, f"{mode.swap}-{i + 1}", SWAP_TOKENS, 1) for i in range(3)]
    reserve = _swap_reserve(mode, inventory, configs[0]) if inventory.has_gpus else 0
    host = HostConfig(reserve=(reserve,), park_ram=PARK_RAM)
    run = d.start_host(inventory, host, [(c, shape) for c in configs], "swap host")
    requests = []
    for k in range(mode.swap_requests):
        name = configs[k % 3].name
        before = run.client.status[name].state
        load = d.Load(name, 1, PROMPT, SWAP_TOKENS, shape.vocab_size)
        (s,) = d.drive_host(run, [load], time.monotonic() + REQUEST_TIMEOUT_S, seed=k, stop_after=1)
        requests.append({
            "model": name, "state_before": before, "tokens": len(s.times), "failed": _failed(s, SWAP_TOKENS),
            "ttft_s": round(s.times[0] - s.submitted, 4) if s.times else None,
        })  # fmt: skip
        print("swap request", requests[-1], file=sys.stderr, flush=True)
    burst = [d.Load(c.name, 1, PROMPT, 16, shape.vocab_size) for c in configs]
    streams = d.drive_host(run, burst, time.monotonic() + REQUEST_TIMEOUT_S, seed=100, stop_after=2)
    coord = run.core.coordinator
    events = [
        {"model": e.model, "action": e.action, "seconds": round(e.seconds, 4), "detail": e.detail} for e in coord.events
    ]
    weights = weight_bytes(mode, shape)
    out = {
        "model_weight_bytes": weights,
        "reserve_bytes": reserve,
        "park_ram_bytes": PARK_RAM,
        "resident_at_start": list(run.core.resident_at_start),
        "sequential_requests": requests,
        "burst_requests": [{"model": s.model, "tokens": len(s.times), "failed": _failed(s, 16)} for s in streams],
        "copies": [
            {"model": m, "copy_s": round(t, 4), "bytes": b, "GBps": round(b / t / 1e9, 1)}
            for m, t, b in run.runtime.copies
        ],
        "events": events,
        "host_copies_bytes": dict(coord.ledger.parked),
        "host_ram_total_available_bytes": list(host_memory()),
        "reconciliations": list(run.reconciliations),
    }
    d.stop_host(run)
    return out


def report(
    mode: Mode, results: dict[str, Any], mps: dict[str, Any], elapsed: float, provenance: dict[str, Any] | None
) -> None:
    from common import gpu_tag, write_result
    from multi_model_report import build

    from llmhost.memory.inventory import detect_inventory

    inventory = detect_inventory()
    gpu = inventory.devices[0].name if inventory.has_gpus else "cpu"
    doc: dict[str, Any] = {
        "bench": "multi_model",
        "what": "several models on one GPU through the host vs threads / processes / MPS with the same engine",
        "gpu": gpu,
        "torch": results.get("pair/baseline", {}).get("torch"),
        "mode": mode.name,
        "dtype": mode.dtype,
        "prompt_tokens": PROMPT,
        "window_s": mode.window_s,
        "warmup_s": mode.warm_s,
        "pair_max_tokens": mode.pair_tokens,
        "four_max_tokens": mode.four_tokens,
        **build(mode, names(mode.pair), names(mode.four), results, mps),
        "raw": results,
        "elapsed_s": round(elapsed, 1),
        "merged": provenance,  # which phases come from an earlier run (another lease of the same GPU kind)
        "command": "python bench/multi_model.py " + " ".join(sys.argv[1:]),
    }
    for t in doc["targets"]:
        print(f"{'MET ' if t['met'] else 'n/a ' if t['met'] is None else 'MISS'} {t['target']}: {t['value']} "
              f"(goal {t['goal']})", file=sys.stderr)  # fmt: skip
    if mode.name == "cpu-smoke":
        print(json.dumps(doc, indent=2))
        return
    write_result("multi_model" + ("-quick" if mode.name == "quick" else ""), gpu_tag(gpu), doc)


PHASES = {"baseline": phase_baseline, "processes": phase_processes, "host": phase_host, "swap": phase_swap}


# -- the run: phases in child processes, MPS, targets -------------------------------------------------------------


def _gpu_memory(field: str) -> int | None:
    """Device 0's memory `field` (used, total) in bytes from NVML (no CUDA context here); None without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(getattr(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)), field))
    except Exception:
        return None


def gpu_used() -> int | None:
    return _gpu_memory("used")


def gpu_total() -> int | None:
    return _gpu_memory("total")


def wait_idle(idle: int | None, limit_s: float = 90.0) -> tuple[float, int | None]:
    """Wait until the GPU holds no more than at the start of the run (+1 GiB): a phase process that has exited may
    still be giving its memory back, which the next phase's host would count as its own (drift). Returns the
    seconds waited and the used bytes at the end."""
    t0 = time.monotonic()
    used = gpu_used()
    while idle is not None and used is not None and used > idle + GiB and time.monotonic() - t0 < limit_s:
        time.sleep(0.5)
        used = gpu_used()
    return time.monotonic() - t0, used


def run_phase(mode: Mode, phase: str, scenario: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phase.json"
        cmd = [sys.executable, __file__, "--phase", phase, "--scenario", scenario, "--mode", mode.name]
        cmd += ["--out", str(out), "--timeout", str(timeout)]
        t0 = time.monotonic()
        print(f"== {phase} {scenario}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, stderr=subprocess.PIPE, text=True, check=False)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            print(err[-6000:], file=sys.stderr, flush=True)
            return {"error": f"timed out after {timeout:.0f} s", "log_tail": err[-2000:]}
        print(proc.stderr[-6000:], file=sys.stderr, flush=True)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit code {proc.returncode}", "log_tail": proc.stderr[-3000:]}
        doc: dict[str, Any] = json.loads(out.read_text())
        doc["phase_s"] = round(time.monotonic() - t0, 1)
        return doc


class Mps:
    """The CUDA MPS control daemon, for the MPS baselines (started and stopped here; its pipe and log folders are
    private to this run)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmhost-mps-"))
        self.env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.dir / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(self.dir / "log"),
        }
        self.exe = shutil.which("nvidia-cuda-mps-control")

    def start(self) -> str | None:
        """None when the daemon runs; otherwise why not."""
        if self.exe is None:
            return "nvidia-cuda-mps-control is not on PATH"
        for sub in ("pipe", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        try:
            r = subprocess.run([self.exe, "-d"], env=self.env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
        if r.returncode != 0:
            return f"exit code {r.returncode}: {(r.stderr or r.stdout).strip()}"
        time.sleep(1.0)
        return None

    def stop(self) -> None:
        if self.exe is not None:
            subprocess.run([self.exe], input="quit\n", env=self.env, capture_output=True, text=True, timeout=30)

    def log_tail(self) -> dict[str, str]:
        out = {}
        for name in ("control.log", "server.log"):
            p = self.dir / "log" / name
            if p.exists():
                out[name] = p.read_text(errors="replace")[-1500:]
        return out


# (result key, phase, scenario, under MPS), in the order they run: the host's own numbers first, MPS last (its
# daemon serves every CUDA process started while it runs).
PLAN = (
    ("pair/baseline", "baseline", "pair", False),
    ("pair/host", "host", "pair", False),
    ("pair/host-unsteered", "host", "pair-unsteered", False),
    ("pair/host-undithered", "host", "pair-undithered", False),  # core.SM_DITHER_ENV off, for comparison
    ("pair/host-collected", "host", "pair-collected", False),  # comparison: core.SOLO_RUN_AHEAD_ENV off
    ("pair/host-lead2", "host", "pair-lead2", False),  # experiment: core.LEAD_STEPS_ENV 2
    ("pair/host-lead2-ditherall", "host", "pair-lead2-ditherall", False),  # and core.DITHER_ALL_ENV on
    ("pair/host-deep", "host", "pair-deep", False),  # core.DEEP_LEVELS_ENV on (the default since)
    ("pair/host-shallow", "host", "pair-shallow", False),  # comparison: core.DEEP_LEVELS_ENV off
    ("pair/host-3:1", "host", "pair-3:1", False),
    ("pair/host-1:3", "host", "pair-1:3", False),
    ("pair/host-minheld3", "host", "pair-minheld3", False),  # experiment: core.SM_MIN_HELD_ENV 0.03
    ("pair/host-settle", "host", "pair-settle", False),  # experiment: core.SM_SETTLE_ENV on
    ("pair/host-oneprompt", "host", "pair-oneprompt", False),  # experiment: core.ONE_PROMPT_ENV on
    ("pair/host-deeper", "host", "pair-deeper", False),  # experiment: core.SM_DEEPER_ENV on
    ("pair/host-lead1", "host", "pair-lead1", False),  # comparison: lead_steps 1, only steered models dithered
    ("pair/processes", "processes", "pair", False),
    ("swap/swap", "swap", "swap", False),
    ("four/host", "host", "four", False),
    ("four/host-unsteered", "host", "four-unsteered", False),
    ("four/baseline", "baseline", "four", False),
    ("four/processes", "processes", "four", False),
    ("four/host-far", "host", "four-far", False),  # experiments (core.FAR_PROMPT_ENV), after what is judged
    ("four/host-unsteered-far", "host", "four-unsteered-far", False),
    ("four/host-lead2", "host", "four-lead2", False),
    ("four/host-lead3", "host", "four-lead3", False),
    ("four/host-lead2-ditherall", "host", "four-lead2-ditherall", False),  # and core.DITHER_ALL_ENV on
    ("four/host-deep", "host", "four-deep", False),  # core.DEEP_LEVELS_ENV on (the default since)
    ("four/host-shallow", "host", "four-shallow", False),  # comparison: core.DEEP_LEVELS_ENV off
    ("four/host-lead2-ditherall-deep", "host", "four-lead2-ditherall-deep", False),
    ("four/host-far-lead2", "host", "four-far-lead2", False),
    ("four/host-undithered", "host", "four-undithered", False),
    ("four/host-collected", "host", "four-collected", False),
    ("four/host-sendearly", "host", "four-sendearly", False),  # experiment: core.SEND_EARLY_ENV on
    ("four/host-apart", "host", "four-apart", False),  # experiment: core.PROMPT_APART_ENV on, prompts on the far SMs
    ("four/host-sendearly-smallfirst", "host", "four-sendearly-smallfirst", False),  # SMALL_FIRST_WEIGHTS
    ("four/host-graphprompt", "host", "four-graphprompt", False),  # the default since then (as sendearly)
    ("four/host-sendearly-graphprompt", "host", "four-sendearly-graphprompt", False),
    ("four/host-sendlate", "host", "four-sendlate", False),  # comparison: SEND_EARLY_ENV off
    ("four/host-eagerprompt", "host", "four-eagerprompt", False),  # comparison: graph_prompt_tokens 0
    ("four/host-graph64", "host", "four-graph64", False),  # experiment: graph_prompt_tokens 64
    ("four/host-spread2", "host", "four-spread2", False),  # experiment: graph_prompt_chunk 64, two steps a prompt
    ("four/host-spread4", "host", "four-spread4", False),  # and 32, four steps a prompt
    ("four/host-lead1", "host", "four-lead1", False),  # comparison: lead_steps 1, only steered models dithered
    ("four/host-minheld3", "host", "four-minheld3", False),  # experiment: core.SM_MIN_HELD_ENV 0.03
    ("four/host-minheld2", "host", "four-minheld2", False),  # and 0.02
    ("four/host-settle", "host", "four-settle", False),  # experiment: core.SM_SETTLE_ENV on
    ("four/host-oneprompt", "host", "four-oneprompt", False),  # experiment: core.ONE_PROMPT_ENV on
    ("four/host-deeper", "host", "four-deeper", False),  # experiment: core.SM_DEEPER_ENV on
    ("four/host-deeper-oneprompt", "host", "four-deeper-oneprompt", False),  # both experiments at once
    ("pair/mps", "processes", "pair", True),
    ("four/mps", "processes", "four", True),
)
TRACE_DIR_ENV = "LLMHOST_BENCH_TRACE_DIR"  # --trace-dir, passed on to the phase processes
MIN_PHASE_S = 45.0  # a phase is not started with less time than this left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, short windows")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny float32 models on the CPU (no MPS, no parking)")
    ap.add_argument("--deadline-s", type=float, default=570.0, help="every phase ends (or is skipped) by then")
    ap.add_argument(
        "--only", help="comma-separated result keys to run (e.g. pair/host,four/mps); the rest from --merge"
    )
    ap.add_argument("--merge", type=Path, help="an earlier result JSON whose phases are kept where not run again")
    ap.add_argument(
        "--trace-dir",
        type=Path,
        help="the host phases' step traces and the together window's token times, a folder per four-model phase, "
        "for bench/probes/itl_tail.py and trace_holds.py (tracing costs the loop a little: not for records)",
    )
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # a child: one phase
        import faulthandler

        import torch

        faulthandler.dump_traceback_later(max(5.0, args.timeout - 10.0), exit=True)  # a hang shows where
        torch.set_grad_enabled(False)
        if args.mode == "cpu-smoke":
            torch.set_num_threads(1)  # tiny models: a thread pool only adds contention between the engines
        doc = PHASES[args.phase](for_gpu(MODES[args.mode]), args.scenario)
        Path(args.out).write_text(json.dumps(doc))
        return
    mode = for_gpu(MODES["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"])
    if args.trace_dir:
        os.environ[TRACE_DIR_ENV] = str(args.trace_dir.resolve())  # every phase process inherits it
    t_begin = time.monotonic()
    results: dict[str, Any] = {}
    mps_note: dict[str, Any] = {"started": False, "why_not": "CPU run"}
    calls: list[dict[str, Any]] = []  # every call whose phases this result holds, oldest first
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        results, mps_note = earlier["raw"], earlier["mps"]
        merged = earlier.get("merged") or {}
        first = {"command": earlier["command"], "ran": merged.get("run_now") or sorted(results)}
        calls = merged.get("calls") or [first]
    only = set(args.only.split(",")) if args.only else {key for key, *_ in PLAN}
    kept = sorted(set(results) - only)
    idle = gpu_used()
    mps: Mps | None = None
    try:
        for key, phase, scenario, under_mps in PLAN:
            if key not in only or (under_mps and not mode.device.startswith("cuda")):
                continue
            left = args.deadline_s - (time.monotonic() - t_begin)
            if left < MIN_PHASE_S:
                results[key] = {"error": f"skipped: {left:.0f} s left of the run's deadline"}
                continue
            env = dict(os.environ)
            if under_mps:
                if mps is None:
                    mps = Mps()
                    why = mps.start()
                    mps_note = {"started": why is None, **({"why_not": why} if why else {})}
                if not mps_note["started"]:
                    results[key] = {"error": f"MPS did not start: {mps_note['why_not']}"}
                    continue
                env = mps.env
            waited, used = wait_idle(idle)
            results[key] = run_phase(mode, phase, scenario, env, min(PHASE_TIMEOUT_S[mode.name], left - 5.0))
            results[key]["waited_for_idle_gpu_s"] = round(waited, 1)
            results[key]["gpu_used_at_start_bytes"] = used
    finally:
        if mps is not None and mps_note.get("started"):
            mps.stop()
            mps_note["logs"] = mps.log_tail()
    provenance = None
    if args.merge:
        command = "python bench/multi_model.py " + " ".join(sys.argv[1:])
        provenance = {"earlier_run": str(args.merge), "run_now": sorted(only), "kept_from_earlier": kept,
                      "calls": [*calls, {"command": command, "ran": sorted(only)}]}  # fmt: skip
    report(mode, results, mps_note, time.monotonic() - t_begin, provenance)


if __name__ == "__main__":
    main()
