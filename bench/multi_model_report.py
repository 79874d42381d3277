"""The JSON document of bench/multi_model.py: each scenario's numbers summarized from its phases, and every target
of issue 6 judged on them (met, not met, or not measured, with the value and the goal side by side)."""

from __future__ import annotations

import statistics
from typing import Any

PAIR_KEYS = ("together_1_1", "together_3_1", "together_1_3")


# The four-model experiments: bench/multi_model.py phase -> (summary key, how its targets are labelled). Judged on
# their own, after the default host's verdicts, which they never change.
EXPERIMENTS = {
    "four/host-far": ("host_far_prompt", " with prompts on the far SMs"),
    "four/host-unsteered-far": ("host_unsteered_far_prompt", " unsteered, prompts on the far SMs"),
    "four/host-lead2": ("host_lead2", " with a lead of two steps"),
    "four/host-lead3": ("host_lead3", " with a lead of three steps"),
    "four/host-lead2-ditherall": ("host_lead2_dither_all", " with a lead of two steps and every model dithered"),
    "four/host-deep": ("host_deep", " with SM levels below 88 of 132 SMs"),
    "four/host-shallow": ("host_shallow", " without SM levels below 88 of 132 SMs"),
    "four/host-lead2-ditherall-deep": (
        "host_lead2_dither_all_deep",
        " with a lead of two steps, every model dithered and SM levels below 88 of 132 SMs",
    ),
    "four/host-far-lead2": ("host_far_prompt_lead2", " with prompts on the far SMs and a lead of two steps"),
    "four/host-undithered": ("host_undithered", " with steered decode steps kept at their SM level"),
    "four/host-collected": ("host_collected", " with solo costs sampled after collections"),
    "four/host-sendearly": ("host_send_early", " with tokens sent before the pass's launches"),
    "four/host-apart": ("host_prompts_apart", " with prompts on the far SMs and decode steps beside them on the near"),
    "four/host-graphprompt": ("host_graph_prompts", " with short prompts as rows of the decode graphs"),
    "four/host-sendearly-graphprompt": (
        "host_send_early_graph_prompts",
        " with tokens sent early and short prompts as rows of the decode graphs",
    ),
    "four/host-sendlate": ("host_send_late", " with tokens sent after the pass's launches"),
    "four/host-eagerprompt": ("host_eager_prompts", " with every prompt in eager prompt steps"),
    "four/host-graph64": ("host_graph64", " with at most 64 prompt rows in a decode graph"),
    "four/host-spread2": ("host_spread2", " with each short prompt spread over two decode steps"),
    "four/host-spread4": ("host_spread4", " with each short prompt spread over four decode steps"),
    "four/host-lead1": ("host_lead1", " with the strict lead of one step, only steered models dithered"),
    "four/host-minheld3": ("host_min_held3", " with SM levels moved at 3% of a window held"),
    "four/host-minheld2": ("host_min_held2", " with SM levels moved at 2% of a window held"),
    "four/host-settle": ("host_settle", " with 0.15 s steering windows while settling"),
    "four/host-oneprompt": ("host_one_prompt", " with one model's prompt tokens at a time, in turns"),
    "four/host-deeper": ("host_deeper", " with SM levels down to 56 of 132 SMs"),
    "four/host-sendearly-smallfirst": (
        "host_send_early_small_first",
        " with tokens sent early and the small models weighted 1.25 to the 8Bs' 1",
    ),
}


# The pair's variants at equal weights: bench/multi_model.py phase -> (summary key, how its targets are labelled).
# Each is put against the same alone speeds as the default host's, and judged after it.
PAIR_EXPERIMENTS = {
    "pair/host-unsteered": ("host_unsteered", " with sm_steering = false"),
    "pair/host-undithered": ("host_undithered", " with steered steps undithered"),
    "pair/host-collected": ("host_collected", " with solo costs sampled after collections"),
    "pair/host-lead2": ("host_lead2", " with a lead of two steps"),
    "pair/host-lead2-ditherall": ("host_lead2_dither_all", " with a lead of two steps and every model dithered"),
    "pair/host-deep": ("host_deep", " with SM levels below 88 of 132 SMs"),
    "pair/host-shallow": ("host_shallow", " without SM levels below 88 of 132 SMs"),
    "pair/host-minheld3": ("host_min_held3", " with SM levels moved at 3% of a window held"),
    "pair/host-lead1": ("host_lead1", " with the strict lead of one step, only steered models dithered"),
    "pair/host-settle": ("host_settle", " with 0.15 s steering windows while settling"),
    "pair/host-oneprompt": ("host_one_prompt", " with one model's prompt tokens at a time, in turns"),
    "pair/host-deeper": ("host_deeper", " with SM levels down to 56 of 132 SMs"),
}


def _tok(stats: dict[str, Any], name: str) -> float | None:
    row = stats.get(name) if isinstance(stats, dict) else None
    return float(row["tokens_per_s"]) if isinstance(row, dict) and "tokens_per_s" in row else None


def _pair_summary(together: dict[str, Any], alone: dict[str, Any], names: list[str], copy_gbps: float | None) -> dict:
    """Per model tok/s alone and together, normalized speed, GPU share; both: normalized sum, effective bandwidth."""
    out: dict[str, Any] = {"models": {}}
    norms = []
    combined = 0.0
    one_token = 0.0  # what one token more or less of each model in the window moves `combined` by
    for n in names:
        t, a = _tok(together, n), _tok(alone, n)
        norm = t / a if t is not None and a else None
        norms.append(norm)
        row = together.get(n, {})
        combined += row.get("bytes_per_s", 0.0)
        one_token += row.get("bytes_per_s", 0.0) / row["tokens"] if row.get("tokens") else 0.0
        out["models"][n] = {
            "tokens_per_s_alone": a,
            "tokens_per_s_together": t,
            "normalized": round(norm, 4) if norm is not None else None,
            "gpu_share": row.get("gpu_share"),
            "itl_ms_together": row.get("itl_ms"),
        }
    if all(x is not None for x in norms):
        out["normalized_sum"] = round(sum(x for x in norms if x is not None), 4)
    out["combined_bandwidth_GBps"] = round(combined / 1e9, 1)
    if one_token:
        out["one_token_each_GBps"] = round(one_token / 1e9, 1)
    by_times = [together.get(n, {}).get("bytes_per_s_by_times") for n in names]  # stream_stats' *_by_times
    if all(b is not None for b in by_times):
        out["combined_bandwidth_by_times_GBps"] = round(sum(b for b in by_times if b is not None) / 1e9, 1)
    if copy_gbps:
        out["fraction_of_copy_bandwidth"] = round(combined / 1e9 / copy_gbps, 4)
    if "failed_requests" in together:
        out["failed_requests"] = together["failed_requests"]
    return out


def _read_at_least(stats: dict[str, Any], names: list[str], copy_gbps: float | None) -> dict[str, Any]:
    """The four models' bytes read per second together, at least (each step's weights shared by every client's
    row: bench/multi_model.py _per_model), and that against the copy bandwidth: near 1, no schedule can raise the
    sum of their speeds much, only move it between them."""
    read = [stats.get(n, {}).get("bytes_per_s") for n in names]
    if any(r is None for r in read):
        return {}
    gbps = sum(r for r in read if r is not None) / 1e9
    out: dict[str, Any] = {"read_GBps_at_least": round(gbps, 1)}
    if copy_gbps:
        out["read_over_copy_bandwidth_at_least"] = round(gbps / copy_gbps, 4)
    return out


def _four_summary(fh: dict[str, Any], names: list[str], copy_gbps: float | None) -> dict[str, Any]:
    """The four-model host phase: aggregate tok/s together, bytes read at least, failed requests, per model alone
    and together."""
    if "together" not in fh:
        return {}
    together, alone = fh["together"], fh.get("alone", {})
    return {
        "aggregate_tokens_per_s": round(sum(_tok(together, n) or 0.0 for n in names), 1),
        **_read_at_least(together, names, copy_gbps),
        "failed_requests": together.get("failed_requests", 0) + fh.get("alone_failed_requests", 0),
        "client_gc_together": together.get("client_gc"),  # the bench process's own pauses (GcPauses)
        "models": {
            n: {
                "tokens_per_s_alone": _tok(alone, n),
                "tokens_per_s_together": _tok(together, n),
                "gpu_share": together.get(n, {}).get("gpu_share"),
                "itl_ms_alone": alone.get(n, {}).get("itl_ms"),
                "itl_ms_together": together.get(n, {}).get("itl_ms"),
                "ttft_ms_together": together.get(n, {}).get("ttft_ms"),
                "first_token_pending_together": together.get(n, {}).get("first_token_pending"),
            }
            for n in names
        },
    }


def _target(name: str, value: Any, goal: str, met: bool | None, **extra: Any) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met, **extra}


def build(
    mode: Any, pair_names: list[str], four_names: list[str], results: dict[str, Any], mps: dict[str, Any]
) -> dict[str, Any]:
    base = results.get("pair/baseline", {})
    copy_gbps = base.get("copy_bandwidth_GBps")
    host = dict(results.get("pair/host", {}))
    for key in ("pair/host-3:1", "pair/host-1:3"):  # each weighting's host ran in a process of its own
        host.update({k: v for k, v in results.get(key, {}).items() if k.startswith("together_")})
    pair: dict[str, Any] = {"shapes": list(mode.pair), "host": {}, "baselines": {}}
    host_alone = host.get("alone", {})
    pair["host"]["alone"] = host_alone
    for key in PAIR_KEYS:
        if key in host:
            pair["host"][key] = _pair_summary(host[key], host_alone, pair_names, copy_gbps)
    for key, (name, _) in PAIR_EXPERIMENTS.items():
        if "together_1_1" in results.get(key, {}):
            together = results[key]["together_1_1"]
            pair[name] = {"together_1_1": _pair_summary(together, host_alone, pair_names, copy_gbps)}
    engine_alone = base.get("alone", {})
    pair["baselines"]["engine_alone"] = engine_alone
    sources = {
        "threads": base.get("threads"),
        "processes": results.get("pair/processes", {}).get("processes"),
        "mps": results.get("pair/mps", {}).get("processes"),
    }
    for key, stats in sources.items():
        if stats:
            pair["baselines"][key] = _pair_summary(stats, engine_alone, pair_names, copy_gbps)

    four: dict[str, Any] = {"shapes": list(mode.four), "clients_per_model": 8, "host": {}, "baselines": {}}
    four["host"] = _four_summary(results.get("four/host", {}), four_names, copy_gbps)
    if "together" in results.get("four/host-unsteered", {}):
        four["host_unsteered"] = _four_summary(results["four/host-unsteered"], four_names, copy_gbps)
    for key, (name, _) in EXPERIMENTS.items():
        if "together" in results.get(key, {}):
            four[name] = _four_summary(results[key], four_names, copy_gbps)
    four_sources = {
        "threads": results.get("four/baseline", {}).get("threads"),
        "processes": results.get("four/processes", {}).get("processes"),
        "mps": results.get("four/mps", {}).get("processes"),
    }
    for key, stats in four_sources.items():
        if stats:
            four["baselines"][key] = {
                "aggregate_tokens_per_s": round(sum(_tok(stats, n) or 0.0 for n in four_names), 1),
                **_read_at_least(stats, four_names, copy_gbps),
                "models": {
                    n: {"tokens_per_s": _tok(stats, n), "itl_ms": stats.get(n, {}).get("itl_ms")} for n in four_names
                },
            }

    swap = results.get("swap/swap", {})
    hosts = ("pair/host", "pair/host-unsteered", "pair/host-undithered", "pair/host-collected", "pair/host-3:1",
             "pair/host-1:3", "four/host", "four/host-unsteered", "swap/swap")  # fmt: skip
    recs = [r for k in hosts for r in results.get(k, {}).get("reconciliations", [])]
    doc: dict[str, Any] = {
        "copy_bandwidth_GBps": copy_gbps,
        "pair": pair,
        "four": four,
        "swap": {k: v for k, v in swap.items() if k != "reconciliations"},
        "memory": {
            "reconciliations": recs,
            "max_abs_relative_error": max((abs(r["relative_error"]) for r in recs), default=None),
        },
        "mps": mps,
    }
    doc["targets"] = targets(pair, four, swap, recs, copy_gbps)
    doc["errors"] = {k: v for k, v in results.items() if isinstance(v, dict) and "error" in v}
    doc["phase_seconds"] = {k: v.get("phase_s") for k, v in results.items() if isinstance(v, dict)}
    return doc


def _pair_equal(
    eq: dict[str, Any], best: dict[str, Any], label: str, best_by_times: dict[str, Any]
) -> list[dict[str, Any]]:
    """The equal-weights pair's two targets: bandwidth above every baseline, normalized speeds within 15%. The first
    says by how much (margin_GBps) and what one token more or less of each model in the window is worth
    (one_token_each_GBps: tokens are counted whole, so a margin below it is within the count's resolution), and
    the same comparison by token times (by_times: not judged yet, reported beside the verdict)."""
    mine = eq.get("combined_bandwidth_GBps")
    margin = None if mine is None or not best else round(mine - max(best.values()), 1)
    out = [_target(f"pair{label}: combined bandwidth above every baseline", mine, f"> {best}",
                   None if mine is None or not best else all(mine > b for b in best.values()), margin_GBps=margin,
                   one_token_each_GBps=eq.get("one_token_each_GBps"),
                   by_times={"host": eq.get("combined_bandwidth_by_times_GBps"), **best_by_times})]  # fmt: skip
    norms = [m.get("normalized") for m in eq.get("models", {}).values()]
    name = f"pair{label}: normalized speeds within 15% (weights 1:1)"
    if len(norms) == 2 and None not in norms:
        a, b = norms
        spread = abs(a - b) / max(a, b)
        out.append(_target(name, round(spread, 4), "<= 0.15", spread <= 0.15, normalized=norms))
    else:
        out.append(_target(name, None, "<= 0.15", None))
    return out


def _four_targets(host: dict[str, Any], bases: dict[str, float], label: str) -> list[dict[str, Any]]:
    """The four-model targets: aggregate against the best baseline, every model's p99 ITL within 3x its solo."""
    agg = host.get("aggregate_tokens_per_s")
    best = max(bases.values()) if bases else None
    out = [_target(f"four{label}: host aggregate tok/s / best baseline", None if agg is None or not best else
                   round(agg / best, 4), ">= 0.90", None if agg is None or not best else agg >= 0.9 * best,
                   host=agg, baselines=bases)]  # fmt: skip
    ratios = {
        n: m["itl_ms_together"]["p99"] / m["itl_ms_alone"]["p99"]
        for n, m in host.get("models", {}).items()
        if m.get("itl_ms_alone") and m.get("itl_ms_together")
    }
    worst = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
    out.append(_target(f"four{label}: worst p99 ITL together / alone", None if worst is None else
                       {"model": worst[0], "ratio": round(worst[1], 3)}, "<= 3", None if worst is None else
                       worst[1] <= 3.0, ratios={n: round(r, 3) for n, r in ratios.items()}))  # fmt: skip
    return out


def targets(
    pair: dict[str, Any], four: dict[str, Any], swap: dict[str, Any], recs: list[dict[str, Any]], copy: float | None
) -> list[dict[str, Any]]:
    out = []
    eq = pair["host"].get("together_1_1", {})
    best = {k: v.get("combined_bandwidth_GBps") for k, v in pair["baselines"].items() if "combined_bandwidth_GBps" in v}
    frac = eq.get("fraction_of_copy_bandwidth")
    out.append(_target("pair: combined effective bandwidth / copy bandwidth (weights 1:1)", frac, ">= 0.88",
                       None if frac is None else frac >= 0.88, combined_GBps=eq.get("combined_bandwidth_GBps"),
                       copy_GBps=copy))  # fmt: skip
    by_times = {
        k: v.get("combined_bandwidth_by_times_GBps")
        for k, v in pair["baselines"].items()
        if "combined_bandwidth_GBps" in v
    }
    out += _pair_equal(eq, best, "", by_times)
    for name, label in PAIR_EXPERIMENTS.values():
        if name in pair:
            out += _pair_equal(pair[name]["together_1_1"], best, label, by_times)
    for key, heavy in (("together_3_1", 0), ("together_1_3", 1)):
        run = pair["host"].get(key, {})
        ns = [m.get("normalized") for m in run.get("models", {}).values()]
        if len(ns) == 2 and None not in ns and ns[1 - heavy]:
            ratio = ns[heavy] / ns[1 - heavy]
            out.append(_target(f"pair: normalized ratio heavy/light, weights {key[9:].replace('_', ':')}",
                               round(ratio, 3), "3 +- 0.45", abs(ratio - 3.0) <= 0.45, normalized=ns))  # fmt: skip
        else:
            out.append(_target(f"pair: normalized ratio, weights {key[9:].replace('_', ':')}", None, "3 +- 0.45", None))

    bases = {k: v["aggregate_tokens_per_s"] for k, v in four["baselines"].items()}
    out += _four_targets(four["host"], bases, "")
    if "host_unsteered" in four:
        out += _four_targets(four["host_unsteered"], bases, " with sm_steering = false")
    for name, label in EXPERIMENTS.values():
        if name in four:
            out += _four_targets(four[name], bases, label)

    copies = swap.get("copies", [])
    gbps = [c["GBps"] for c in copies]
    out.append(_target("swap: host-to-device copy GB/s (median; min)", None if not gbps else
                       [round(statistics.median(gbps), 1), min(gbps)], ">= 45", None if not gbps else
                       statistics.median(gbps) >= 45))  # fmt: skip
    unparks = [e["seconds"] for e in swap.get("events", []) if e["action"] == "unpark"]
    out.append(_target("swap: whole swap-in seconds (coordinator, median; max)", None if not unparks else
                       [round(statistics.median(unparks), 3), max(unparks)], "< 0.7", None if not unparks else
                       statistics.median(unparks) < 0.7))  # fmt: skip
    reqs = swap.get("sequential_requests", []) + swap.get("burst_requests", [])
    failed = sum(1 for r in reqs if r.get("failed"))
    out.append(_target("swap: failed requests", None if not reqs else failed, "== 0",
                       None if not reqs else failed == 0, requests=len(reqs)))  # fmt: skip
    worst_mem = max((abs(r["relative_error"]) for r in recs), default=None)
    out.append(_target("memory: |predicted - measured| / measured after every load", worst_mem, "<= 0.02",
                       None if worst_mem is None else worst_mem <= 0.02, reconciliations=len(recs)))  # fmt: skip
    return out
