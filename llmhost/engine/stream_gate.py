"""StreamGate: hold the kernels queued on a CUDA stream until the host has queued all of them, then let them run as
one burst.

Why: the host core launches an eager prompt step a decoder layer per loop pass beside other models' decode steps
(host/core.py, slices.py), which takes tens of milliseconds of Python for a 3B or 8B model. Ungated, the GPU runs
each layer's kernels as they arrive, so the prompt's few milliseconds of GPU work trickle over its whole launch:
every decode step of every other model in that window shares the GPU with it (a 1B model's decode step 2x its
length beside an 8B's prompt), and the step's GPU time, from its first kernel to its last, is its launch time (a
3B model's 128-token prompt: 19-45 ms, bench/probes/host_trace.py), which the fair-share scheduler then charges.
Gated, the prompt's GPU time is its own, and the window it slows the others in is that long.

How: `hold` queues a one-program kernel that polls a flag in GPU memory until it reaches the hold's ticket;
`release` writes the ticket from a stream of the highest priority. Correctness never depends on the gate, only
timing: the poll gives up after MAX_POLLS reads (about 0.16 s on the H100), so a release
that never comes (a launch that raised, a device synchronization while held) delays the stream, it cannot hang it.
Not `cuStreamWaitValue32`: a stream waiting on memory has no such bound.
"""

from __future__ import annotations

import torch

from llmhost.engine.kernels.hold import hold_kernel

# Flag reads before a held stream goes on without its release: 2^18 took 39 ms on the H100 (0.15 us a read,
# bench/kernels_check.py), so this is about 0.16 s: longer than any launch in slices measured (an 8B model's
# 512-token prompt, 26-40 ms from its first slice to its last), short enough that a missed release costs one slow
# step, not a hung stream.
MAX_POLLS = 1 << 20


class StreamGate:
    """One per GPU. Tickets grow by one per hold; a release opens every hold up to its ticket."""

    def __init__(self, device: torch.device | str, max_polls: int = MAX_POLLS) -> None:
        self.device = torch.device(device)
        self.max_polls = max_polls
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.polls = torch.zeros(1, dtype=torch.int32, device=self.device)  # the last hold's reads of the flag
        self.issued = 0
        self.released = 0
        _, highest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
        # Releases must not queue behind the work they release, nor wait long for an SM beside busy streams.
        self.releases = torch.cuda.Stream(self.device, priority=highest)  # type: ignore[no-untyped-call]
        # Holds now: the kernel's first launch compiles it (tens of milliseconds). Tickets 1 and 16 compiled
        # variants of their own before the ticket was kept from specialization (kernels/hold.py); 16 rounds cover
        # that too. On the default stream, each released before it is held (so it passes at once): more than a
        # few kernels on a second stream slow every later kernel of the process (host/core.py, _stream), a model
        # alone on this GPU with them.
        default = torch.cuda.default_stream(self.device)
        for _ in range(16):
            self.release(self.issued + 1, default)
            self.hold(default)
        default.synchronize()

    def hold(self, stream: torch.cuda.Stream) -> int:
        """Queue a hold on `stream`: what is queued on it after this runs once `release(ticket)` was called (or
        after MAX_POLLS reads). Returns the ticket."""
        self.issued += 1
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            hold_kernel[(1,)](self.flag, self.polls, self.issued, MAX_POLLS=self.max_polls)
        return self.issued

    def release(self, ticket: int, stream: torch.cuda.Stream | None = None) -> None:
        """Open the hold of `ticket` (and any earlier one still closed), from `stream` (the releases stream when
        None). The flag only grows: a late release of an earlier ticket must not close a later hold that has not
        started polling yet."""
        self.released = max(self.released, ticket)
        with torch.cuda.device(self.device), torch.cuda.stream(stream or self.releases):
            self.flag.fill_(self.released)
