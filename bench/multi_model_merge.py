"""Rebuild a bench/multi_model.py result from the raw phases of several calls' results on the same GPU kind, each
phase taken from the file named for it: for when the device time of one call cannot hold every phase. The targets
are judged again (multi_model_report.build); the result lists each source file, its command and the phases taken.

Usage: python bench/multi_model_merge.py OUT SOURCE.json:key,key [SOURCE.json:key,key ...]
  e.g. python bench/multi_model_merge.py bench/results/multi_model-h200.json \\
         bench/results/multi_model_call_b-h200.json:pair/baseline,pair/host \\
         bench/results/multi_model_call_a-h200.json:pair/mps
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multi_model import names
from multi_model_report import build

# What every source must agree on, and the merged result keeps from the first.
SETTINGS = ("bench", "what", "gpu", "mode", "dtype", "prompt_tokens", "window_s", "warmup_s", "pair_max_tokens",
            "four_max_tokens")  # fmt: skip


def merge(sources: list[tuple[Path, list[str]]]) -> dict[str, Any]:
    docs = [(path, json.loads(path.read_text()), keys) for path, keys in sources]
    first = docs[0][1]
    for path, doc, keys in docs:
        differ = [k for k in SETTINGS if doc.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{path}: {', '.join(differ)} differ from {docs[0][0]}'s: not one kind of run")
        missing = [k for k in keys if k not in doc["raw"]]
        if missing:
            raise SystemExit(f"{path} has no phase {', '.join(missing)} (it has {', '.join(sorted(doc['raw']))})")
    results: dict[str, Any] = {}
    mps: dict[str, Any] = first["mps"]
    for _, doc, keys in docs:
        for k in keys:
            if k in results:
                raise SystemExit(f"phase {k} named twice")
            results[k] = doc["raw"][k]
            if k.endswith("/mps"):
                mps = doc["mps"]
    pair, four = first["pair"]["shapes"], first["four"]["shapes"]
    mode = SimpleNamespace(pair=tuple(pair), four=tuple(four))
    torch_version = next((d["torch"] for _, d, keys in docs if d.get("torch")), None)
    return {
        **{k: first[k] for k in SETTINGS},
        "torch": torch_version,
        **build(mode, names(tuple(pair)), names(tuple(four)), results, mps),
        "raw": results,
        "merged": {
            "sources": [
                {
                    "file": str(path),
                    "command": doc["command"],
                    "calls": (doc.get("merged") or {}).get("calls"),
                    "phases": keys,
                }
                for path, doc, keys in docs
            ]
        },
        "command": "python bench/multi_model_merge.py " + " ".join(sys.argv[1:]),
    }


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    sources = []
    for arg in sys.argv[2:]:
        path, _, keys = arg.partition(".json:")  # keys may hold colons themselves (pair/host-3:1)
        path += ".json"
        sources.append((Path(path), [k for k in keys.split(",") if k]))
    doc = merge(sources)
    for t in doc["targets"]:
        print(f"{'MET ' if t['met'] else 'n/a ' if t['met'] is None else 'MISS'} {t['target']}: {t['value']} "
              f"(goal {t['goal']})", file=sys.stderr)  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
