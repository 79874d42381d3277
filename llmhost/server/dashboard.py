"""`GET /dashboard`: one HTML page showing what `llmhost ps` shows, live: each device (its models, the ledger against
the driver after its latest load) and each model (state, memory by kind, requests, KV use, GPU share, keep-alive),
with load and unload buttons.

The page is static and needs no key; its script reads `GET /admin/ps` once a second and posts to the admin routes,
with the API key the user types in when the server asks for one (kept in the tab's sessionStorage only). No
external scripts or styles: the server may run where nothing outside can be reached.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

REFRESH_MS = 1000

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>llmhost</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; }
  th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
  th:first-child, td:first-child { text-align: left; }
  .state { font-weight: 600; }
  .loaded { color: #17803d; } .parked { color: #9a6700; } .loading { color: #0969da; }
  .unloaded { color: #777; } .failed { color: #cf222e; }
  #status { color: #777; } #key { display: none; margin: 1em 0; }
  .error { color: #cf222e; white-space: normal; text-align: left; }
</style>
</head>
<body>
<h1>llmhost</h1>
<div id="status">connecting...</div>
<div id="key">API key: <input id="keyinput" type="password" size="30"> <button id="keysave">use</button></div>
<h2>Devices</h2>
<table id="devices"></table>
<h2>Models</h2>
<table id="models"></table>
<script>
"use strict";
const REFRESH_MS = __REFRESH_MS__;

function headers() {
  const key = sessionStorage.getItem("llmhost-key");
  return key ? {"Authorization": "Bearer " + key} : {};
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function table(id, columns, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const head = t.createTHead().insertRow();
  for (const c of columns) { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); }
  const body = t.createTBody();
  for (const r of rows) r(body.insertRow());
}

function ago(t) {
  return t ? Math.max(0, Math.round(Date.now() / 1000 - t)) + " s ago" : "";
}

function showDevices(devices) {
  const columns = ["device", "name", "memory", "models", "driver used", "ledger error", "after"];
  table("devices", columns, devices.map(d => row => {
    const r = d.reconciliation;
    cell(row, d.label);
    cell(row, d.name);
    cell(row, bytes(d.total));
    cell(row, d.models.join(", "));
    cell(row, r ? bytes(r.driver_used) : "");
    cell(row, r ? (100 * r.relative_error).toFixed(2) + " %" : "");
    cell(row, r ? r.action + " " + r.after + ", " + ago(r.at) : "");
  }));
}

function showModels(models) {
  const columns = ["model", "state", "device", "weights", "kv", "other", "running", "waiting", "kv blocks",
                   "gpu share", "prefix hits", "swaps in", "idle until", ""];
  table("models", columns, models.map(m => row => {
    const mem = m.memory || {};
    cell(row, m.name);
    cell(row, m.state + (m.unloading ? ", unloading" : ""), "state " + m.state);
    cell(row, m.device);
    cell(row, bytes(mem.weights || 0));
    cell(row, bytes(mem.kv || 0));
    cell(row, bytes((mem.workspace || 0) + (mem.graphs || 0)));
    cell(row, m.running);
    cell(row, m.waiting);
    cell(row, m.kv_blocks_total ? m.kv_blocks_used + " / " + m.kv_blocks_total : "");
    cell(row, (100 * m.gpu_share).toFixed(1) + " %");
    const q = m.prefix_queried_tokens;
    cell(row, q ? (100 * m.prefix_hit_tokens / q).toFixed(0) + " % of " + q : "");
    cell(row, m.swaps_in + (m.last_swap_s != null ? " (" + m.last_swap_s.toFixed(2) + " s)" : ""));
    cell(row, m.keep_alive_s < 0 ? "pinned" : (m.expires_at ? new Date(m.expires_at * 1000).toLocaleTimeString() : ""));
    const actions = cell(row, "");
    for (const action of ["load", "unload"]) {
      const b = document.createElement("button");
      b.textContent = action;
      b.onclick = () => admin(m.name, action);
      actions.appendChild(b);
    }
    if (m.error) errorRow(row, m.error);
  }));
}

function errorRow(row, text) {
  // Right under the model's row (rows are built in order): why its last load failed.
  const td = cell(row.parentNode.insertRow(), text, "error");
  td.colSpan = 14;
}

async function admin(name, action) {
  const url = "/admin/models/" + encodeURIComponent(name).replace(/%2F/g, "/") + "/" + action;
  const r = await fetch(url, {method: "POST", headers: headers()});
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    alert(action + " " + name + ": " + ((body.error || {}).message || r.status));
  }
  refresh();
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/admin/ps", {headers: headers()});
    if (r.status === 401) {
      document.getElementById("key").style.display = "block";
      status.textContent = "this server needs its API key";
      return;
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const doc = await r.json();
    document.getElementById("key").style.display = "none";
    showDevices(doc.devices || []);
    showModels(doc.models || []);
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    status.textContent = "no answer from the server (" + e.message + ")";
  }
}

document.getElementById("keysave").onclick = () => {
  sessionStorage.setItem("llmhost-key", document.getElementById("keyinput").value);
  refresh();
};
refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body>
</html>
""".replace("__REFRESH_MS__", str(REFRESH_MS))


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(PAGE)

    return r
