"""`llmhost serve`: plan, start the host-core process, and serve the OpenAI-compatible API with uvicorn.

Shutdown (Ctrl-C or SIGTERM): the first signal marks the server as stopping (new requests get 503), stops the host
(in-flight streams end with an error event, since their host requests fail) and lets uvicorn close its
connections; then the host process is joined, so nothing is left running. A second Ctrl-C forces uvicorn out.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import signal
import socket
import threading
from importlib import resources
from pathlib import Path
from types import FrameType

import uvicorn
from rich.console import Console

from llmhost.cli import open_model_checkpoint
from llmhost.config import Config, load_config
from llmhost.engine.tokenizer import Tokenizer
from llmhost.errors import UsageError
from llmhost.host.client import HostClient
from llmhost.host.coordinator import plan_residencies
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.history import History
from llmhost.memory.inventory import Inventory, detect_inventory, parse_gpu_spec
from llmhost.report import render_plan
from llmhost.server.app import create_app
from llmhost.server.state import ServerState

GRACEFUL_SHUTDOWN_S = 5  # uvicorn's wait for open connections after the streams were ended


def default_config() -> Config:
    """The embedded defaults (llmhost/data/default_models.toml)."""
    return load_config(Path(str(resources.files("llmhost") / "data" / "default_models.toml")))


def _bind(host: str, port: int) -> socket.socket:
    """Bind before anything starts, so a port in use is one clear line, not a traceback after the models load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(bind_failure(host, port, e)) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_failure(host: str, port: int, e: OSError) -> str:
    """Which option to change, and how: an address this machine does not have and a port in use are different
    fixes, and "pick another --port" for a mistyped --host sends the user the wrong way."""
    reason = e.strerror or str(e)
    if isinstance(e, socket.gaierror):
        return (
            f"--host {host}: not an IP address or a host name this machine can resolve ({reason}); "
            "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or ::1 (IPv6, no brackets)"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return (
            f"--host {host}: not an address of this machine ({reason}); "
            "use 127.0.0.1, 0.0.0.0 or one of this machine's own addresses"
        )
    if e.errno == errno.EADDRINUSE:
        return f"--port {port}: in use on {host} ({reason}); pick another --port or stop the process using it"
    if e.errno == errno.EACCES:
        return f"--port {port}: permission denied ({reason}); ports below 1024 need root, use one like 8000"
    return f"cannot listen on {host}:{port} ({reason}); check --host and --port"


def curl_line(url: str, model: str, api_key: str | None) -> str:
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


class _Server(uvicorn.Server):
    """uvicorn, plus: the first exit signal also stops the host, so open streams end now instead of at uvicorn's
    graceful-shutdown timeout."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.stopper: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.stopper is None:
            self.state.stopping = True
            # HostClient.stop joins the host process; a signal handler must not block the event loop.
            self.stopper = threading.Thread(target=self.state.client.stop, name="llmhost-stop")
            self.stopper.start()


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    inventory: Inventory = detect_inventory() if args.gpus == "auto" else parse_gpu_spec(args.gpus)
    console = Console()
    specs = [ModelSpec.from_checkpoint(m, open_model_checkpoint(config, m)) for m in config.models]
    # The figures earlier loads measured replace the estimate where they exist (LLMHOST_HISTORY=off: never).
    residencies = plan_residencies(specs, inventory, config.host, History())
    render_plan(residencies.resident, inventory, console)
    if residencies.on_demand:
        console.print(f"loaded on demand, evicting idle models (each fits alone): {', '.join(residencies.on_demand)}")
    sock = _bind(args.host, args.port)
    # Tokenizers first: converting a GGUF vocabulary writes a cache the host process then reads, never both at once.
    tokenizers = {m.name: Tokenizer.from_checkpoint(open_model_checkpoint(config, m)) for m in config.models}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(message)s")
    client = HostClient(config, inventory)
    client.start()
    try:
        app = create_app(client, tokenizers, api_key=args.api_key)
        state: ServerState = app.state.llmhost
        shown = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{shown}:{sock.getsockname()[1]}"  # the port the OS picked, for --port 0
        console.print(f"serving {', '.join(tokenizers)} at [bold]{url}[/] (models load in the background)")
        console.print(curl_line(url, config.models[0].name, args.api_key), soft_wrap=True, markup=False)
        console.print(f"dashboard: {url}/dashboard", soft_wrap=True, markup=False)
        server = _Server(
            uvicorn.Config(
                app,
                log_level="info",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                lifespan="off",
                access_log=args.access_log,
            ),
            state,
        )
        # uvicorn re-raises the signal it caught once it is done; default handlers would kill us (SIGTERM) or
        # raise KeyboardInterrupt (SIGINT) before the host is joined.
        previous = {s: signal.signal(s, _note_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if server.stopper is not None:
                server.stopper.join()
    finally:
        client.stop()
        sock.close()
    return 0


def _note_signal(sig: int, frame: FrameType | None) -> None:
    """Stands in for the default handlers while uvicorn runs: uvicorn raises the signal it handled again on its
    way out, which must not kill the process before the host is joined."""
