"""A one-program kernel that polls a flag in GPU memory until it reaches a ticket, or gives up after MAX_POLLS
reads: the hold of engine/stream_gate.py (why a stream is held there)."""

import triton
import triton.language as tl


# Not specialized on the ticket: Triton compiles a variant per integer "kind" (1, a multiple of 16, other), so
# tickets 2 and 16 each compiled one on first use, a 50-60 ms stall of the host loop (bench/probes/host_trace.py).
@triton.jit(do_not_specialize=["ticket"])
def hold_kernel(flag_ptr, polls_ptr, ticket, MAX_POLLS: tl.constexpr):
    seen = tl.load(flag_ptr, volatile=True)
    polls = 0
    while (seen < ticket) & (polls < MAX_POLLS):
        seen = tl.load(flag_ptr, volatile=True)
        polls += 1
    tl.store(polls_ptr, polls)  # how long it held: MAX_POLLS means it gave up (the checks read it)
