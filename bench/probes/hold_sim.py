"""Probe, off the GPU: a simulation of the host's four-model decode loop, to see what GpuScheduler's lead_steps does
to each model's token gaps. The scheduler is the real one (llmhost/host/gpu_scheduler.py): its picks, launch_ok,
follow_ok (running ahead), done_s and solo-cost charges, as host/core.py drives them; the GPU and the loop are
models of them, fitted to an H100 four-model run (bench/results/multi_model_graph_prompts_call3-h100.json and its
step classes in step_company_graph_prompts_call3-h100.json):

- each model's decode step (batch 8) has a solo cost (its solo mean token gap); 1 in PROMPT_EVERY steps carries a
  128-token prompt's rows and costs PROMPT_COST times more; every step's cost varies by NOISE (lognormal sigma);
- steps on the GPU at once share its bandwidth: model i streams its weights at most at its solo rate B_i, and the
  steps running split BANDWIDTH_TBPS in proportion to GRAB_i (the four together: 1B 3.1x, 3B 2.8x, 8B 2.5x their
  solo step, as step_company measured beside three others);
- the loop is one thread: a collection takes COLLECT_MS of it, a launch (staging and graph replay) LAUNCH_MS; a step
  queued behind its model's step in flight (run ahead) starts on the GPU when that one ends.

SM steering is not simulated (it confines the 8Bs; here each keeps its bandwidth grab). What the simulation shows is
the shape of the holds: which gaps fair sharing lengthens and by how much, per lead_steps. It measures nothing on a
GPU; the bench's phases four/host-lead2 and -lead3 do.

`--fair-grabs` gives each model the grab at which all four progress alike when they run together (in proportion to
their solo streaming rates: the split ideal SM steering would reach), so fair sharing never has to hold anyone: the
best the token gaps can be with these step costs, prompts and noise, whatever the scheduler does. `--bandwidth 3.0`
is what the H100's four models read together in the bench (3.0-3.1 TB/s, each at 0.34-0.35 of its solo speed).

Usage: python bench/probes/hold_sim.py [--seconds S] [--leads 1,2,3] [--dither 0.85] [--grab 8b-1=0.25,...]
       [--fair-grabs] [--bandwidth TBPS] [--seeds 1,2,3] [--clients [--one-prompt]] [--charge-rows] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

from multi_model_drivers import percentile

from llmhost.host.gpu_scheduler import GpuScheduler
from llmhost.host.prompt_turns import PromptTurns

DEV = "cuda:0"
# name -> (solo decode step ms, solo weight-streaming TB/s, bandwidth grab beside others)
MODELS = {
    "1b": (1.47, 1.68, 0.169),
    "3b": (3.28, 1.96, 0.218),
    "8b-1": (6.40, 2.50, 0.306),
    "8b-2": (6.40, 2.50, 0.306),
}
BANDWIDTH_TBPS = 3.25  # what the four steps read together (0.96-1.02 of the copy bandwidth)
PROMPT_EVERY = 32  # 8 clients of 256-token answers: a new 128-token prompt every 32 steps of a model
PROMPT_COST = 1.31  # a step with a prompt's rows over one without (step_company: 3B 11.9 / 9.1 ms, 1B 6.0 / 4.5)
NOISE = 0.04
# --clients: each model's 8 clients as the bench runs them, all sending their first prompt at the start, each
# answer ANSWER_TOKENS long, a step carrying one client's prompt (128 rows) and that client decoding from the next.
# Prompts then come in bursts of up to 8 consecutive steps per model, and the two 8Bs' bursts coincide (the bench's
# step traces, bench/probes/prompt_company.py). While a step carries prompt rows it also takes PROMPT_GRAB times its
# bandwidth grab from the steps beside it (fitted to the traces: the 1B's token gap 1.13-1.17x beside one 8B's
# prompt rows, 1.51x beside both 8Bs' at once).
CLIENTS = 8
ANSWER_TOKENS = 256
PROMPT_GRAB = 1.5
COLLECT_MS = 0.05
LAUNCH_MS = 0.42  # the loop's median decode launch (loop_passes.py)
TICK_MS = 0.01
WARMUP_S = 0.5
STEP_WALL_ALPHA = 0.2  # as host/core.py's


@dataclass
class Step:
    cost_ms: float  # its solo GPU time
    queued_at: float  # when the loop finished launching it
    grab: float  # its model's bandwidth grab, less where it was dithered (launched while ahead)
    began: float | None = None  # on the GPU
    prompt: bool = False  # carries a prompt's rows
    done: float = 0.0  # fraction of its solo cost run


@dataclass
class Model:
    name: str
    solo_ms: float
    rate_tbps: float
    grab: float
    steps: list[Step] = field(default_factory=list)  # in flight, oldest first (at most two: one queued behind)
    left: list[int] = field(default_factory=lambda: [0] * CLIENTS)  # --clients: tokens each client still awaits
    prompt_since: list[float] = field(default_factory=lambda: [0.0] * CLIENTS)  # when each client's prompt came
    prompt_waits: list[float] = field(default_factory=list)  # --clients: prompt came -> its step launched, ms
    wall_ms: float | None = None  # EMA of began -> collected
    collections: list[float] = field(default_factory=list)
    held_ms: float = 0.0
    waiting_since: float | None = None


def fair_grabs(names: list[str]) -> dict[str, float]:
    """The grabs (summing to 1) at which `names`, running together, each stream at the same fraction of its solo
    rate: in proportion to those rates."""
    total = sum(MODELS[n][1] for n in names)
    return {n: round(MODELS[n][1] / total, 4) for n in names}


def simulate(
    names: list[str],
    seconds: float,
    lead_steps: float,
    dither: float = 1.0,
    seed: int = 1,
    bandwidth_tbps: float = BANDWIDTH_TBPS,
    clients: bool = False,
    one_prompt: bool = False,
    charge_rows: bool = False,
) -> dict[str, Any]:
    """Token gaps of `names` decoding together for `seconds`; `dither`: the bandwidth grab of a step launched while
    its model is ahead of the others (GpuScheduler.lead), as a fraction of its own (1.0: none; SM steering's level
    below, 112 of 132 SMs: about 0.85). `clients`: prompts as the bench's clients send them (CLIENTS), not at
    random; `one_prompt` (with clients): a step takes a prompt only in its model's turn (host/prompt_turns.py, the
    host's LLMHOST_ONE_PROMPT=1); `charge_rows`: a step carrying prompt rows is expected and charged at PROMPT_COST
    times its model's solo cost, not at the solo cost (the host charges the solo cost; this asks what charging the rows
    would do)."""
    rng = random.Random(seed)
    turns = PromptTurns() if one_prompt else None
    gpu = GpuScheduler(lead_steps=lead_steps)
    models = {n: Model(n, *MODELS[n]) for n in names}
    for m in models.values():
        gpu.add(m.name, DEV)
        gpu.observe(m.name, 8, 0, m.solo_ms / 1e3)

    def carries(m: Model, at: float) -> bool:
        """Whether m's step launched at `at` carries a prompt (--clients: a waiting client's, in its turn)."""
        if not clients:
            return rng.random() < 1.0 / PROMPT_EVERY
        for i, left in enumerate(m.left):  # the tokens of the steps in flight and this one
            if left > 0:
                m.left[i] = left - 1
                if m.left[i] == 0:
                    m.prompt_since[i] = at
        waiting = [i for i, left in enumerate(m.left) if left == 0]
        others = any(s.prompt for o in models.values() if o is not m for s in o.steps)
        if not waiting or (turns is not None and not turns.may_take(DEV, m.name, True, others, at / 1e3)):
            return False
        first = min(waiting, key=lambda i: m.prompt_since[i])
        m.left[first] = ANSWER_TOKENS
        m.prompt_waits.append(at - m.prompt_since[first])
        return True

    def step(m: Model, at: float, began: float | None) -> Step:
        lead = gpu.lead(m.name, in_flight()) if not alone else None
        grab = m.grab * (dither if lead is not None and lead > 0.0 else 1.0)
        prompt = carries(m, at)
        c = m.solo_ms * rng.lognormvariate(0.0, NOISE) * (PROMPT_COST if prompt else 1.0)
        return Step(c, at, grab * (PROMPT_GRAB if prompt and clients else 1.0), began=began, prompt=prompt)

    def charged(s: Step) -> float:
        """A step's expected and charged cost over its model's solo cost (the rows' extra with charge_rows)."""
        return PROMPT_COST if charge_rows and s.prompt else 1.0

    def cost_s(m: Model, s: Step) -> float:
        return m.solo_ms / 1e3 * charged(s)

    def in_flight() -> dict[str, float]:
        return {n: sum(cost_s(m, s) for s in m.steps) for n, m in models.items() if m.steps}

    def done_s(now: float) -> dict[str, float]:
        out = {}
        for n, m in models.items():
            if m.steps and m.wall_ms and m.steps[0].began is not None:
                s = m.steps[0]  # its usual wall time stretched as its charge is
                out[n] = min(1.0, max(0.0, now - s.began) / (m.wall_ms * charged(s))) * cost_s(m, s)
        return out

    now, loop_free = 0.0, 0.0
    alone = len(models) == 1
    while now < seconds * 1e3:
        # The GPU: every model's oldest step that has begun progresses at its share of the bandwidth.
        running = [m for m in models.values() if m.steps and m.steps[0].began is not None]
        total = min(bandwidth_tbps, sum(m.rate_tbps for m in running))
        grabs = sum(m.steps[0].grab for m in running)
        finished = []
        for m in running:
            speed = min(1.0, m.steps[0].grab / grabs * total / m.rate_tbps)  # fraction of its solo speed
            s = m.steps[0]
            s.done += speed * TICK_MS / s.cost_ms
            if s.done >= 1.0:
                finished.append(m)
        for m in finished:
            m.steps[0].done = 1.0
            if len(m.steps) > 1:  # the step queued behind it starts now
                m.steps[1].began = max(now, m.steps[1].queued_at)
        # The loop: a pass when it is free.
        if now >= loop_free:
            t = now
            for m in models.values():  # collections
                if m.steps and m.steps[0].done >= 1.0:
                    s = m.steps.pop(0)
                    t += COLLECT_MS
                    m.collections.append(t)
                    assert s.began is not None
                    wall = t - s.began
                    m.wall_ms = wall if m.wall_ms is None else m.wall_ms + STEP_WALL_ALPHA * (wall - m.wall_ms)
                    gpu.charge(m.name, cost_s(m, s))
                    if m.steps and m.steps[0].began is not None:
                        m.steps[0].began = max(m.steps[0].began, t)
            waiting = [n for n, m in models.items() if not m.steps]
            decoding = {n for n, m in models.items() if m.steps}
            while waiting:  # launches after a collection, in the scheduler's order, while within the bounds
                name = gpu.pick(DEV, waiting, busy=decoding)
                if name is None:
                    break
                m = models[name]
                if not alone and not gpu.launch_ok(name, in_flight(), done_s=done_s(t)):
                    for n in waiting:
                        if models[n].waiting_since is None:
                            models[n].waiting_since = t
                    break
                waiting.remove(name)
                if m.waiting_since is not None:
                    m.held_ms += t - m.waiting_since
                    m.waiting_since = None
                t += LAUNCH_MS
                m.steps.append(step(m, t, t))
                decoding.add(name)
            for n, m in models.items():  # running ahead: a second step queued behind the one in flight
                if len(m.steps) != 1 or m.steps[0].done >= 1.0:
                    continue
                if alone or gpu.follow_ok(n, in_flight(), done_s(t)):
                    t += LAUNCH_MS
                    m.steps.append(step(m, t, None))
            loop_free = max(t, now + TICK_MS)
        now += TICK_MS
    out = {}
    for n, m in models.items():
        gaps = [b - a for a, b in zip(m.collections, m.collections[1:], strict=False) if a >= WARMUP_S * 1e3]
        out[n] = {
            "gap_mean_ms": round(sum(gaps) / len(gaps), 3),
            "gap_p99_ms": round(percentile(gaps, 0.99), 3),
            "held_share": round(m.held_ms / (now - WARMUP_S * 1e3), 3),
        }
        if clients and m.prompt_waits:
            out[n]["prompt_wait_ms"] = {"mean": round(sum(m.prompt_waits) / len(m.prompt_waits), 2),
                                        "max": round(max(m.prompt_waits), 2)}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--leads", default="1,2,3")
    ap.add_argument("--dither", type=float, default=1.0, help="grab of a step launched while ahead (0.85: a level)")
    ap.add_argument("--grab", default="", help="MODEL=GRAB,...: other bandwidth grabs (a deeper SM level's)")
    ap.add_argument("--fair-grabs", action="store_true", help="grabs at which all progress alike (no holds needed)")
    ap.add_argument("--bandwidth", type=float, default=BANDWIDTH_TBPS, help="TB/s the steps read together")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--clients", action="store_true", help="prompts as the bench's clients send them (bursts)")
    ap.add_argument("--one-prompt", action="store_true", help="with --clients: prompts taken in turns")
    ap.add_argument("--charge-rows", action="store_true", help="steps carrying prompt rows charged their extra cost")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    names = list(MODELS)
    solo = {n: simulate([n], args.seconds, 1.0, bandwidth_tbps=args.bandwidth, clients=args.clients)[n] for n in names}
    grabs = fair_grabs(names) if args.fair_grabs else {n: MODELS[n][2] for n in names}
    for item in filter(None, args.grab.split(",")):
        name, grab = item.split("=")
        grabs[name] = float(grab)
    for n, g in grabs.items():
        MODELS[n] = (*MODELS[n][:2], g)
    seeds = [int(x) for x in args.seeds.split(",")]
    runs: dict[str, Any] = {}
    for lead in (float(x) for x in args.leads.split(",")):
        for seed in seeds:
            together = simulate(
                names, args.seconds, lead, args.dither, seed, args.bandwidth, args.clients, args.one_prompt,
                args.charge_rows,
            )  # fmt: skip
            models = {
                n: {
                    **r,
                    "normalized": round(solo[n]["gap_mean_ms"] / r["gap_mean_ms"], 3),
                    "p99_over_solo": round(r["gap_p99_ms"] / solo[n]["gap_p99_ms"], 3),
                }
                for n, r in together.items()
            }
            worst = max(m["p99_over_solo"] for m in models.values())
            runs[f"lead {lead:g}" + (f", seed {seed}" if len(seeds) > 1 else "")] = {**models, "worst": worst}
    command = "python bench/probes/hold_sim.py " + " ".join(sys.argv[1:])
    text = json.dumps(
        {"command": command, "dither": args.dither, "bandwidth_tbps": args.bandwidth, "grabs": grabs,
         "clients": args.clients, "one_prompt": args.one_prompt, "charge_rows": args.charge_rows,
         "solo": solo, "together": runs},
        indent=1,
    )  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
