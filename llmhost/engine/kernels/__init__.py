"""Triton kernels for the GPU decode path. Each has a torch reference in the engine and a check against it
(tests run them under TRITON_INTERPRET=1 on the CPU; bench/kernels_check.py on the GPU)."""
