"""Test-session set-up."""

import os

# Without a GPU, Triton kernels run under Triton's interpreter (numpy on the CPU). It must be chosen before any
# kernel module is imported, because @triton.jit picks the interpreter at decoration time.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
