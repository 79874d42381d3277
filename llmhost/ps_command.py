"""`llmhost ps`: ask a running server what each model is doing (GET /admin/ps) and print it as a table, like
`ollama ps`. Standard library HTTP only: it must stay quick and work without the server extras."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

from llmhost.errors import LlmhostError, UsageError
from llmhost.units import fmt_bytes

TIMEOUT_S = 10.0
EXAMPLE_URL = "http://127.0.0.1:8000"
_HOST_PORT = re.compile(r"^[\w.-]+:\d+$")  # "localhost:8000": a URL without its scheme


class ServerUnreachableError(LlmhostError):
    """The server named by --url did not answer, or answered with an error."""


def check_url(url: str) -> str:
    """--url must be an http(s) URL with a host: urllib raises a bare ValueError for 'notaurl', http.client one of
    its own for a port that is not a number, and other schemes (ftp://) would be tried as they are."""
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0  # .port checks range
    except ValueError as e:
        raise UsageError(
            f"--url {url!r}: not a valid URL ({e}); give the server's base URL like {EXAMPLE_URL}"
        ) from None
    if not ok:
        hint = f" (did you mean http://{url}?)" if _HOST_PORT.match(url) else ""
        raise UsageError(f"--url {url!r}: expected the server's base URL like {EXAMPLE_URL}{hint}")
    return url


def fetch_ps(url: str, api_key: str | None) -> dict[str, Any]:
    req = urllib.request.Request(check_url(url).rstrip("/") + "/admin/ps")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        hint = "; pass --api-key" if e.code == 401 else ""
        raise ServerUnreachableError(f"{url}: HTTP {e.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerUnreachableError(
            f"{url}: no llmhost server answered ({reason}); is `llmhost serve` running?"
        ) from None
    except (http.client.HTTPException, ValueError) as e:
        # Something answered, but not in HTTP (another protocol on that port) or not with JSON (another server).
        # Its text may hold what the peer sent, line breaks included: the message is one line.
        detail = " ".join(str(e).split())[:80]
        raise ServerUnreachableError(
            f"{url}: the answer is not an llmhost server's ({type(e).__name__}: {detail}); check --url's host and port"
        ) from None


def _ago(t: float | None, now: float) -> str:
    return "-" if not t else f"{_duration(now - t)} ago"


def _until(entry: dict[str, Any], now: float) -> str:
    if entry["state"] != "loaded":
        return "-"
    if entry["keep_alive_s"] < 0:
        return "forever"
    if entry["expires_at"] is None:
        return "in use"
    left = entry["expires_at"] - now
    return f"{_duration(left)} from now" if left > 0 else "now"


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def render_ps(doc: dict[str, Any], console: Console) -> None:
    now = time.time()
    table = Table()
    for col in ("NAME", "STATE", "DEVICE", "WEIGHTS", "KV", "OTHER", "TOTAL", "KV USED", "RUN/WAIT", "SINCE", "UNTIL"):
        table.add_column(col, justify="right" if col in ("WEIGHTS", "KV", "OTHER", "TOTAL") else "left")
    for m in doc["models"]:
        mem = m["memory"]
        state = m["state"] + (f" ({m['error']})" if m["error"] else "") + (", unloading" if m.get("unloading") else "")
        row_bytes = ["-"] * 4
        if mem:
            # workspace + CUDA-graph pools: what the model needs beyond its weights and KV cache
            other = mem.get("workspace", 0) + mem.get("graphs", 0)
            row_bytes = [fmt_bytes(n) for n in (mem.get("weights", 0), mem.get("kv", 0), other, m["memory_total"])]
        table.add_row(
            m["name"],
            state,
            m["device"] or "-",
            *row_bytes,
            f"{m['kv_blocks_used']}/{m['kv_blocks_total']}" if m["kv_blocks_total"] else "-",
            f"{m['running']}/{m['waiting']}",
            _ago(m["since"], now),
            _until(m, now),
        )
    console.print(table)


def run_ps(args: argparse.Namespace) -> int:
    doc = fetch_ps(args.url, args.api_key)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_ps(doc, Console())
    return 0
