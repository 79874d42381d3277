"""A one-program kernel that polls a flag in GPU memory until it reaches a ticket, or gives up after MAX_POLLS
reads: the hold of engine/stream_gate.py (why a stream is held there)."""

import triton
import triton.language as tl


@triton.jit
def hold_kernel(flag_ptr, polls_ptr, ticket, MAX_POLLS: tl.constexpr):
    seen = tl.load(flag_ptr, volatile=True)
    polls = 0
    while (seen < ticket) & (polls < MAX_POLLS):
        seen = tl.load(flag_ptr, volatile=True)
        polls += 1
    tl.store(polls_ptr, polls)  # how long it held: MAX_POLLS means it gave up (the checks read it)
