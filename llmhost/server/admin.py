"""Admin routes: `GET /admin/ps` (like `ollama ps`: what each model is doing now, where, with how many bytes) and
`POST /admin/models/{name}/load|unload` (the ps entry; a load that fails answers 500 `model_load_failed` with the
reason, and the entry under "model").

The ps document (schema `llmhost.ps/1`), one entry per configured model:
`{"name", "state", "device", "memory": {"weights", "kv", "workspace", "graphs"}, "memory_total", "since" (epoch
seconds the state began), "keep_alive_s", "expires_at" (epoch seconds after which an idle model may be parked; null
while in use or when keep_alive is -1), "in_flight" (sequences the API has sent), "running", "waiting",
"kv_blocks_used", "kv_blocks_total", "max_seq_len", "error", "unloading", "gpu_share" (fraction of its device's
measured GPU time since it became resident), "host_copy_bytes" (pinned RAM holding its weights), "swaps_in",
"last_swap_s", "prefix_queried_tokens", "prefix_hit_tokens" (prompt tokens the prefix cache looked up and found,
since the engine was built)}`; and one entry per device under "devices": `{"device", "label", "name", "total",
"models" (names of the models placed there), "reconciliation" (the ledger against the driver after the latest load
or swap-in there: `{"after", "action", "at", "placed", "runtime", "external", "driver_used", "relative_error"}`, or
null)}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from llmhost.host.client import HostUnavailableError
from llmhost.host.ledger import Reconciliation
from llmhost.host.messages import LoadRecord, ModelStatus
from llmhost.server.errors import ApiError, from_host_error, model_not_found
from llmhost.server.state import ServerState

PS_SCHEMA = "llmhost.ps/1"


def ps_entry(state: ServerState, name: str, st: ModelStatus | None) -> dict[str, Any]:
    cfg = state.client.config.model(name)
    in_flight = state.gate.in_flight.get(name, 0)
    expires_at: float | None = None
    if st is not None and st.state == "loaded" and in_flight == 0 and cfg.keep_alive_s >= 0:
        expires_at = max(st.since, state.gate.last_used.get(name, 0.0)) + cfg.keep_alive_s
    return {
        "name": name,
        "state": st.state if st else "loading",
        "device": st.device if st else "",
        "memory": dict(st.memory) if st else {},
        "memory_total": sum(st.memory.values()) if st else 0,
        "since": st.since if st else None,
        "keep_alive_s": cfg.keep_alive_s,
        "expires_at": expires_at,
        "in_flight": in_flight,
        "running": st.running if st else 0,
        "waiting": st.waiting if st else 0,
        "kv_blocks_used": st.kv_blocks_used if st else 0,
        "kv_blocks_total": st.kv_blocks_total if st else 0,
        "max_seq_len": cfg.max_seq_len,
        "error": st.error if st else "",
        "unloading": st.unloading if st else False,
        "gpu_share": st.gpu_share if st else 0.0,
        "host_copy_bytes": st.host_copy_bytes if st else 0,
        "swaps_in": st.swaps_in if st else 0,
        "last_swap_s": st.last_swap_s if st else None,
        "prefix_queried_tokens": st.prefix_queried_tokens if st else 0,
        "prefix_hit_tokens": st.prefix_hit_tokens if st else 0,
    }


def device_entries(state: ServerState, status: dict[str, ModelStatus]) -> list[dict[str, Any]]:
    """Each device of the inventory, the models placed on it now, and its latest reconciliation."""
    latest: dict[int, tuple[LoadRecord, Reconciliation]] = {}
    for record in state.client.loads:  # oldest first: later records replace earlier ones
        for rec in record.reconciliations:
            latest[rec.device] = (record, rec)
    out = []
    for dev in state.client.inventory.devices:
        where = [n for n, st in status.items() if dev.torch_name in st.device.split(",")]
        entry: dict[str, Any] = {
            "device": dev.torch_name,
            "label": dev.label,
            "name": dev.name,
            "total": dev.total,
            "models": where,
            "reconciliation": None,
        }
        if dev.index in latest:
            record, rec = latest[dev.index]
            entry["reconciliation"] = {
                "after": record.model,
                "action": record.action,
                "at": record.at,
                "placed": rec.placed,
                "runtime": rec.runtime,
                "external": rec.external,
                "driver_used": rec.driver_used,
                "relative_error": rec.relative_error,
            }
        out.append(entry)
    return out


def router(state: ServerState, require_key: Callable[..., Awaitable[None]]) -> APIRouter:
    r = APIRouter(prefix="/admin", dependencies=[Depends(require_key)])

    @r.get("/ps")
    async def ps() -> JSONResponse:
        status = await state.fresh_status()
        models = [ps_entry(state, name, status.get(name)) for name in state.model_names]
        return JSONResponse({"schema": PS_SCHEMA, "models": models, "devices": device_entries(state, status)})

    async def command(action: Literal["load", "unload"], name: str, force: bool = False) -> JSONResponse:
        if name not in state.tokenizers:
            raise model_not_found(name, state.model_names)
        try:
            reply = await state.client.admin(action, name, force)
        except HostUnavailableError as e:
            raise from_host_error(e, name) from None
        if not reply.ok:  # the host's only refusal: a model it does not know (the API checked its own list)
            raise ApiError(404, reply.message, param="name", code="model_not_found")
        st = {m.name: m for m in reply.models}.get(name)
        entry = ps_entry(state, name, st)
        if action == "load" and st is not None and st.state == "failed":
            # A 200 would read as success to every client that checks the status only; the ps entry stays in the
            # body for those that want the whole picture.
            error = ApiError(
                500,
                f"model '{name}' failed to load: {st.error}; fix the cause (the server log has the details) and "
                f"POST /admin/models/{name}/load again",
                "server_error",
                code="model_load_failed",
            )
            return JSONResponse({**error.body(), "model": entry}, status_code=error.status)
        return JSONResponse(entry)

    # `:path`: HF-style model names hold a slash ("org/model").
    @r.post("/models/{name:path}/load")
    async def load(name: str) -> JSONResponse:
        return await command("load", name)

    @r.post("/models/{name:path}/unload")
    async def unload(name: str, force: bool = False) -> JSONResponse:
        """Unloaded once the requests in the model finish (the reply then says "unloading": true); `?force=true`
        fails them and unloads at once."""
        return await command("unload", name, force)

    return r
