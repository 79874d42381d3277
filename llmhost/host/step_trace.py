"""StepTrace: an optional record of the host loop's steps, for finding where inter-token latency goes (which step
of which model was in flight, how long it took on the GPU, how many ran beside it). On when the environment
variable LLMHOST_STEP_TRACE names a file; the host writes it (JSON lines) when it stops. Off, it costs an
attribute test per step and four clock reads per loop pass (the pass's timing, traced when it is slow)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "LLMHOST_STEP_TRACE"


class StepTrace:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get(ENV)
        return cls(Path(path)) if path else None

    def add(self, event: str, model: str, rows: int, prefill: int, **fields: Any) -> None:
        """One event (a launch, a collection, a slow loop pass or send, a garbage collection), stamped with
        time.monotonic() (one clock for every process of the machine, so a client's token times line up with
        it)."""
        self.records.append(
            {"t": time.monotonic(), "ev": event, "model": model, "rows": rows, "prefill": prefill, **fields}
        )

    def write(self) -> None:
        with self.path.open("w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
