"""ServerState: what every route shares — the host client, each model's tokenizer, metrics, the in-flight gate —
and the checks every generation request passes before anything is sent to the host."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llmhost.engine.tokenizer import Tokenizer
from llmhost.host.client import HostClient, HostRequestError, HostUnavailableError
from llmhost.host.messages import ModelStatus
from llmhost.server.errors import ApiError, from_host_error, model_not_found, model_unavailable
from llmhost.server.generation import ModelGate
from llmhost.server.metrics import Metrics

log = logging.getLogger("llmhost.server")

STATUS_TIMEOUT_S = 1.0  # a host busy loading a model answers queries only between loads; use the last status then


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down", retry_after=5)


@dataclass
class ServerState:
    client: HostClient
    tokenizers: Mapping[str, Tokenizer]
    metrics: Metrics
    gate: ModelGate
    api_key: str | None = None
    created: int = 0  # the `created` of every model card: when the server started
    stopping: bool = False
    _logged_fields: set[str] = field(default_factory=set)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.client.config.models]

    def note_unknown_fields(self, names: Iterable[str]) -> None:
        """Clients send fields we do not implement (tools, response_format, logit_bias...); they are ignored, and
        each name is logged once so an operator can see what clients expect."""
        for name in names:
            if name not in self._logged_fields:
                self._logged_fields.add(name)
                log.info("ignoring request field '%s' (not supported; logged once)", name)

    def check_model(self, name: str) -> None:
        """Raise the ApiError a request for `name` gets now: 503 while stopping, 404 unknown, 503 when its last load
        failed. A model that is loading, parked or unloaded takes the request: the host brings it in first."""
        if self.stopping:
            raise shutting_down()
        if name not in self.tokenizers:
            raise model_not_found(name, self.model_names)
        if not self.client.alive:
            raise self.host_error(HostUnavailableError("the host process is not running"), name)
        st = self.client.status.get(name)
        if st is not None and st.state == "failed":
            raise model_unavailable(name, st.state, st.error)

    def host_error(self, e: HostRequestError | HostUnavailableError, model: str) -> ApiError:
        if self.stopping and isinstance(e, HostUnavailableError):
            return shutting_down()
        return from_host_error(e, model)

    async def fresh_status(self) -> dict[str, ModelStatus]:
        """Ask the host for every model's status (KV use, queue lengths change with every step); fall back to the
        last status pushed when the host is busy loading or gone."""
        with contextlib.suppress(TimeoutError, HostUnavailableError):
            await asyncio.wait_for(self.client.query(), STATUS_TIMEOUT_S)
        return dict(self.client.status)
