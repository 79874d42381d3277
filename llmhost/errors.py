"""Typed errors with actionable messages. The CLI prints `str(error)` as one line and exits with `exit_code`."""

from __future__ import annotations


class LlmhostError(Exception):
    """Base of every error that is the user's input, not our bug. Never shown as a traceback."""

    exit_code = 2


class ConfigError(LlmhostError):
    """The TOML config is malformed, names an unknown key, or holds an invalid value."""


class ModelFileError(LlmhostError):
    """A checkpoint path is missing, incomplete or corrupt."""


class UnsupportedModelError(LlmhostError):
    """The checkpoint's architecture is not one llmhost can run."""


class UsageError(LlmhostError):
    """A command-line option holds an invalid value (a port out of range, a URL that is not one), or names an
    address this machine cannot listen on."""


class InventoryError(LlmhostError):
    """A `--gpus` spec cannot be parsed, or pinning names a GPU that does not exist."""


class PlanInfeasibleError(LlmhostError):
    """The models do not fit on the GPUs. Carries the remedies computed by the planner."""

    exit_code = 3


class RequestError(LlmhostError):
    """A generation request is invalid: empty or too-long prompt, out-of-range sampling values."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, for OpenAI-style error bodies


class PromptTooLongError(RequestError):
    """The prompt (plus at least one generated token) exceeds the model's max_seq_len."""
