"""Test-session set-up."""

import os
from pathlib import Path

import pytest

# Without a GPU, Triton kernels run under Triton's interpreter (numpy on the CPU). It must be chosen before any
# kernel module is imported, because @triton.jit picks the interpreter at decoration time.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def session_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test, and every process a test starts (the host core records after each load), writes the measured
    memory history into this session's temporary directory, never into the user's cache."""
    path = tmp_path_factory.mktemp("history") / "history.sqlite"
    os.environ["LLMHOST_HISTORY"] = str(path)
    return path
