"""Render inspect and plan results: rich tables for people, one JSON document (stable schema) for programs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmhost.config import DTYPE_BYTES
from llmhost.memory.estimate import StageNeed
from llmhost.memory.inventory import Inventory
from llmhost.memory.plan import Plan, Shortfall
from llmhost.model_files.checkpoint import Checkpoint
from llmhost.units import GiB, fmt_bytes

PLAN_SCHEMA = "llmhost.plan/1"
INSPECT_SCHEMA = "llmhost.inspect/1"


def inspect_json(ckpt: Checkpoint) -> dict[str, Any]:
    s = ckpt.shape
    parts = ckpt.params_by_part()
    return {
        "schema": INSPECT_SCHEMA,
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": s.architecture,
        "hf_architecture": s.hf_architecture,
        "parameters": ckpt.param_count,
        "stored_dtypes": ckpt.stored_dtypes(),
        "stored_bytes": ckpt.stored_bytes,
        "layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "attention_heads": s.num_heads,
        "kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "intermediate_size": s.intermediate_size,
        "vocab_size": s.vocab_size,
        "tied_embeddings": s.tie_embeddings,
        "max_position_embeddings": s.max_position_embeddings,
        "rope_theta": s.rope_theta,
        "rope_scaling": s.rope_scaling,
        "sliding_window": s.sliding_window,
        "sliding_layers": s.num_sliding_layers,
        "kv_bytes_per_token": {dt: s.kv_bytes_per_token(b) for dt, b in DTYPE_BYTES.items()},
        "layer_parameters": parts.get(0, 0),
        "bytes_per_layer": {dt: parts.get(0, 0) * b for dt, b in DTYPE_BYTES.items()},
        "embedding_parameters": parts.get("embed", 0),
        "head_parameters": parts.get("head", 0),
    }


def render_inspect(ckpt: Checkpoint, console: Console) -> None:
    doc = inspect_json(ckpt)
    # Names and metadata come from the file: escape them so rich never reads them as markup.
    table = Table(title=escape(f"{ckpt.path.name} ({ckpt.format})"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in doc.items():
        if key in ("schema", "path"):
            continue
        if key == "parameters":
            value = f"{value:,}"
        elif key == "stored_bytes":
            value = fmt_bytes(value)
        elif key == "stored_dtypes":
            value = ", ".join(f"{dt}: {n:,} params" for dt, n in value.items())
        elif key in ("kv_bytes_per_token", "bytes_per_layer"):
            value = ", ".join(f"{dt} {fmt_bytes(n)}" for dt, n in value.items())
        table.add_row(key.replace("_", " "), escape(str(value)))
    console.print(table)


def plan_json(plan: Plan, inventory: Inventory, history: Path | None = None) -> dict[str, Any]:
    """history: the measured-memory history file the plan consulted (None: none was)."""
    gpus = []
    for b in plan.budgets:
        d = b.device
        gpus.append(
            {
                "index": d.index,
                "name": d.name,
                "kind": d.kind,
                "total_bytes": d.total,
                "external_bytes": d.external,
                "runtime_bytes": b.runtime,
                "reserve_bytes": b.reserve,
                "usable_bytes": b.usable,
                "used_bytes": plan.used_on(d.index),
                "free_bytes": plan.free_on(d.index),
                "models": [
                    {"model": m.name, "layers": [s.start, s.end], **_need_json(s.need)}
                    for m, s in plan.stages_on(d.index)
                ],
            }
        )
    models = []
    for m in plan.models:
        models.append(
            {
                "name": m.name,
                "load_order": m.load_order,
                "gpus": list(m.devices),
                "split": len(m.stages) > 1,
                "stages": [{"gpu": s.device, "layers": [s.start, s.end], **_need_json(s.need)} for s in m.stages],
                "total_bytes": m.total,
                "kv_tokens": m.kv_tokens,
                "kv_blocks": m.kv_blocks,
                "max_seq_len": m.max_seq_len,
                "max_batch": m.max_batch,
                "max_seq_len_fit": m.max_seq_len_fit,
                "fit_limited_by": m.fit_limited_by,
            }
        )
    return {
        "schema": PLAN_SCHEMA,
        "feasible": True,
        "inventory": {"source": inventory.source, "note": inventory.note},
        "block_size": plan.block_size,
        "history": None if history is None else str(history),
        "gpus": gpus,
        "models": models,
    }


def _need_json(need: StageNeed) -> dict[str, Any]:
    at = need.measured_at
    return {
        "weights_bytes": need.weights,
        "kv_bytes": need.kv,
        "workspace_bytes": need.workspace,
        "graphs_bytes": need.graphs,
        "total_bytes": need.total,
        "from_history": list(need.measured),
        "history_recorded_at": None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
    }


def _local_time(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def infeasible_json(sf: Shortfall, inventory: Inventory) -> dict[str, Any]:
    return {
        "schema": PLAN_SCHEMA,
        "feasible": False,
        "inventory": {"source": inventory.source, "note": inventory.note},
        "error": {
            "model": sf.model,
            "where": sf.where,
            "need_bytes": sf.need,
            "available_bytes": sf.available,
            "short_by_bytes": sf.short_by,
            "short_by_gib": round(sf.short_by / GiB, 3),
            "remedies": list(sf.remedies),
        },
    }


def render_plan(plan: Plan, inventory: Inventory, console: Console) -> None:
    """The plan as tables."""
    if inventory.note:
        console.print(f"[yellow]{inventory.note}[/]")
    for b in plan.budgets:
        d = b.device
        title = escape(f"{d.label}: {d.name}, {fmt_bytes(d.total)}")
        table = Table(title=title, title_justify="left")
        for col in ("model", "layers", "weights", "KV", "workspace", "graphs", "total"):
            table.add_column(col, justify="left" if col in ("model", "layers") else "right")
        rows = plan.stages_on(d.index)
        measured = [(m, s) for m, s in rows if s.need.measured]
        pad = " " if measured else ""  # unmarked figures line up with the marked ones
        for m, s in rows:
            layers = f"{s.start}-{s.end - 1}" if len(m.stages) > 1 else "all"
            n = s.need
            terms = {"weights": n.weights, "kv": n.kv, "workspace": n.workspace, "graphs": n.graphs}
            cells = [fmt_bytes(v) + ("*" if t in n.measured else pad) for t, v in terms.items()]
            table.add_row(m.name, layers, *cells, fmt_bytes(n.total) + pad)
        if measured:
            when = ", ".join(f"{m.name} ({_local_time(s.need.measured_at)})" for m, s in measured)
            table.caption = escape(f"* from measured history: {when}")
            table.caption_justify = "left"
        table.add_section()
        table.add_row("external", "", "", "", "", "", fmt_bytes(d.external) + pad)
        table.add_row("runtime", "", "", "", "", "", fmt_bytes(b.runtime) + pad)
        table.add_row("reserve", "", "", "", "", "", fmt_bytes(b.reserve) + pad)
        table.add_row("[bold]free[/]", "", "", "", "", "", f"[bold]{fmt_bytes(plan.free_on(d.index))}[/]{pad}")
        console.print(table)
    models = Table(title="models (in load order)", title_justify="left")
    for col in ("#", "model", "device(s)", "KV tokens", "max_seq_len", "max_batch", "largest max_seq_len"):
        models.add_column(col)
    for m in plan.models:
        where = ", ".join(plan.budgets[i].device.label for i in m.devices)
        fit = f"{m.max_seq_len_fit:,}" + {"model": " (model limit)", "kv_tokens": " (kv_tokens)"}.get(
            m.fit_limited_by, ""
        )
        models.add_row(
            str(m.load_order + 1),
            m.name,
            where,
            f"{m.kv_tokens:,}",
            f"{m.max_seq_len:,}",
            str(m.max_batch),
            fit,
        )
    console.print(models)
