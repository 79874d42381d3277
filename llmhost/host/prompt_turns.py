"""PromptTurns: on each GPU, which model may take prompt tokens next (as rows of its decode graph or an eager prompt
step) when only one model's prompt work should run at a time. Pure bookkeeping over times; no torch.

Why: in an H100 four-model trace the 1B's and 3B's largest token gaps were those beside other models'
prompt-carrying decode steps, most of all beside both 8Bs' at once (their clients run in lockstep): the 1B's gaps
there 6.35 ms on average and up to 7.8, against 4.21 beside none (python bench/probes/prompt_company.py,
bench/results/prompt_company_record_20261206b-h100.json). Kept to one at a time by a plain rule (take prompt tokens
only while no other model's are in flight), one 8B never found the GPU free of the others' prompts within the 4 s
window: six of its requests waited for their first token all along (bench/results/multi_model_oneprompt-h100.json,
where the rule gave 3.27x against 3.66x for the worst p99 over solo, a gain that starving the 8B's prompts bought).
So a model that had to wait keeps its place: one waiting longer goes first, and after MAX_WAIT_S a model takes its
prompt tokens whatever else runs.

Simulated first (python bench/probes/hold_sim.py --leads 2 --dither 0.85 --bandwidth 3.0 --clients [--one-prompt]
--seeds 1,2,3,4: the bench's clients, whose prompts come in bursts of eight, and a prompt-carrying step taking 1.5x
its share of the bandwidth from the steps beside it; bench/results/hold_sim_clients-cpu.json and
hold_sim_clients_oneprompt-cpu.json): the 1B's p99 over solo 2.70-2.73x with turns against 2.86-2.91x without,
the 8Bs' a little lower, the 3B's the same (2.99-3.06x against 2.98-3.04x, the worst either way), and every prompt
waits longer for its step: the 1B's 27 ms on average against 3, the 8Bs' 133-152 ms against 33 (up to 0.49 s
against 0.16), each of a burst's prompts waiting for a turn.

Measured on the H100 (bench phase four/host-oneprompt, bench/results/multi_model_experiments_20261206c-h100.json):
worst p99 over solo 3.37x (the 3B; the 1B's 2.89x) against the default's 3.37x (the 1B) in the same call, the 8Bs'
3.06x / 3.13x against 2.98x / 2.95x, the second 8B's time to first token 96 ms at the p99 against 68, and one request
each of the 1B and the 3B still without a first token at the window's end: the tail moved from one model to another,
no gain. In the next call (_20261206d) its solo windows had slow gaps, so it compares in ms only: the 1B's and 3B's
p99 together 7.84 / 14.95 ms against the default's 7.04 / 14.89. Off by default.
"""

from __future__ import annotations

# How long a model with prompt tokens waits for its turn at most: about two decode steps of an 8B beside three
# models (17-19 ms each), so a prompt takes at most that much longer to its first token.
MAX_WAIT_S = 0.04


class PromptTurns:
    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        if max_wait_s < 0.0:
            raise ValueError("max_wait_s must be >= 0")
        self.max_wait_s = max_wait_s
        # device -> model -> (since when it waits for its turn, when it last asked)
        self._waiting: dict[str, dict[str, tuple[float, float]]] = {}

    def may_take(self, device: str, model: str, pending: bool, others_prompting: bool, now: float) -> bool:
        """Whether `model`'s next step on `device` may take prompt tokens now. `pending`: it has prompt tokens to
        take (a model without any never waits); `others_prompting`: another model's step with prompt tokens is in
        flight on the device. Yes when none is and no other model has waited longer, or when it has waited
        max_wait_s; otherwise it waits, in order from now."""
        waiting = self._waiting.setdefault(device, {})
        # A model that stopped asking (its requests went, or its prompt was taken some other way) keeps no place:
        # waiting models ask at every step of theirs, far more often than max_wait_s.
        for other in [m for m, (_, asked) in waiting.items() if m != model and now - asked > self.max_wait_s]:
            del waiting[other]
        if not pending:
            waiting.pop(model, None)
            return True
        since = waiting[model][0] if model in waiting else None
        mine = now if since is None else since
        first = all(t >= mine for other, (t, _) in waiting.items() if other != model)
        if (first and not others_prompting) or (since is not None and now - since >= self.max_wait_s):
            waiting.pop(model, None)
            return True
        waiting[model] = (mine, now)
        return False

    def waiting(self, device: str) -> tuple[str, ...]:
        """The models waiting for their turn on `device`, longest first."""
        waiting = self._waiting.get(device, {})
        return tuple(sorted(waiting, key=lambda m: waiting[m][0]))

    def forget(self, model: str) -> None:
        """A model that left its GPU."""
        for waiting in self._waiting.values():
            waiting.pop(model, None)
