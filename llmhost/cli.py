"""`llmhost` command line: inspect, plan, generate, serve, ps. User mistakes print one line and exit 2 (3: the models
do not fit); never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console

from llmhost.config import Config, ModelConfig, load_config, resolve_path_argument
from llmhost.errors import LlmhostError, ModelFileError, UnsupportedModelError, UsageError
from llmhost.memory.estimate import ModelSpec
from llmhost.memory.history import History
from llmhost.memory.inventory import Inventory, detect_inventory, parse_gpu_spec
from llmhost.memory.planner import PlanInfeasible, plan_models
from llmhost.model_files import Checkpoint, open_checkpoint
from llmhost.report import infeasible_json, inspect_json, plan_json, render_inspect, render_plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except LlmhostError as e:
        print(f"llmhost: error: {e}", file=sys.stderr)
        return e.exit_code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmhost", description="Host several LLMs on one machine's GPUs at once.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    ins = sub.add_parser("inspect", help="read a checkpoint's shape and sizes without loading weights")
    ins.add_argument("path", help="HF model directory, .gguf file, package:MODULE/FILE or package-assembled:MODULE")
    ins.add_argument("--json", action="store_true", help="print one JSON document")
    ins.set_defaults(func=_cmd_inspect)

    pl = sub.add_parser("plan", help="place models on GPUs and predict every byte, before loading anything")
    pl.add_argument("config", help="models.toml")
    pl.add_argument("--gpus", default="auto", help="'auto' (NVML) or a simulated list like '2x24GiB,1x80GiB'")
    pl.add_argument("--json", action="store_true", help="print one JSON document (schema llmhost.plan/1)")
    pl.add_argument(
        "--no-history", action="store_true", help="ignore what earlier loads measured; plan from the estimate alone"
    )
    pl.set_defaults(func=_cmd_plan)

    ge = sub.add_parser("generate", help="load one model and complete a prompt (CPU or GPU)")
    ge.add_argument("path", help="HF model directory or .gguf file")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ge.add_argument("--max-tokens", type=int, default=128)
    ge.add_argument("--temperature", type=float, default=0.0)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ge.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    ge.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ge.add_argument("--max-seq-len", type=int, default=4096)
    ge.add_argument("--json", action="store_true", help="print one JSON document with tokens and timings")
    ge.set_defaults(func=_cmd_generate)

    se = sub.add_parser("serve", help="serve every configured model through an OpenAI-compatible HTTP API")
    se.add_argument("--config", default=None, help="models.toml (default: embedded SmolLM2-135M + Gemma 3 270M)")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /admin routes")
    se.add_argument("--gpus", default="auto", help="'auto' (NVML) or a simulated list like '2x24GiB,1x80GiB'")
    se.add_argument("--access-log", action="store_true", help="log every HTTP request")
    se.set_defaults(func=_cmd_serve)

    ps = sub.add_parser("ps", help="show what each model of a running server is doing")
    ps.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ps.add_argument("--api-key", default=None)
    ps.add_argument("--json", action="store_true", help="print the server's JSON document (schema llmhost.ps/1)")
    ps.set_defaults(func=_cmd_ps)
    return p


def _cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = open_checkpoint(resolve_path_argument(args.path))
    if args.json:
        print(json.dumps(inspect_json(ckpt), indent=2))
    else:
        render_inspect(ckpt, Console())
    return 0


def inventory_from_arg(spec: str) -> Inventory:
    return detect_inventory() if spec == "auto" else parse_gpu_spec(spec)


def open_model_checkpoint(config: Config, model: ModelConfig) -> Checkpoint:
    """A configured model's checkpoint. A problem with it names the config file and table too: the path came from
    there (resolved against the config file's directory), so that is where it gets fixed."""
    try:
        return open_checkpoint(model.path)
    except (ModelFileError, UnsupportedModelError) as e:
        where = config.source or "<config>"
        raise type(e)(f"{where}: [models.{model.name}] path: {e}") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    inventory = inventory_from_arg(args.gpus)
    specs = [ModelSpec.from_checkpoint(m, open_model_checkpoint(config, m)) for m in config.models]
    history = None if args.no_history else History()
    try:
        plan = plan_models(specs, inventory, config.host, history)
    except PlanInfeasible as e:
        if args.json:
            print(json.dumps(infeasible_json(e.shortfall, inventory), indent=2))
        print(f"llmhost: error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        used = history.path if history is not None and history.enabled else None
        print(json.dumps(plan_json(plan, inventory, used), indent=2))
    else:
        render_plan(plan, inventory, Console())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    # torch is imported here, not at the top: inspect and plan stay fast and work without it.
    from llmhost.generate_command import run_generate

    return run_generate(args)


def check_port(port: int) -> int:
    """Checked before serve imports torch and plans: bind() raises OverflowError outside 0-65535. 0 asks the OS for
    a free port, which serve prints."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: out of range; use a port from 1 to 65535 such as 8000 (0: any free port)")
    return port


def _cmd_serve(args: argparse.Namespace) -> int:
    check_port(args.port)
    from llmhost.serve_command import run_serve

    return run_serve(args)


def _cmd_ps(args: argparse.Namespace) -> int:
    from llmhost.ps_command import run_ps

    return run_ps(args)


if __name__ == "__main__":
    sys.exit(main())
