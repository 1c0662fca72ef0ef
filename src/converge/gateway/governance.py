"""Governance on the data path: a deployment the snapshot marks as not permitted answers 403,
and hooks (rulesets, guardrails) may refuse a request or change its body before it is sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from converge.gateway.auth import Caller
from converge.gateway.dataplane import Route
from converge.gateway.errors import GatewayError
from converge.gateway.metrics import GatewayMetrics


@dataclass(slots=True)
class Refusal:
    """What a governance hook answers to refuse a request (403 unless it says otherwise)."""

    message: str
    status: int = 403
    code: str = "refused_by_policy"


@dataclass(slots=True)
class HookContext:
    caller: Caller
    route: Route
    endpoint: str
    body: dict[str, Any]  # a hook may change it; the changed body is what gets forwarded


Hook = Callable[[HookContext], Awaitable[Refusal | None]]


class Governance:
    def __init__(self, hooks: list[Hook], metrics: GatewayMetrics) -> None:
        self.hooks = hooks  # the Gateway's list: hooks added later apply at once
        self.metrics = metrics

    def permit(self, route: Route) -> None:
        if route.denial is not None:
            self.metrics.rejected.labels("governance").inc()
            raise GatewayError(
                403,
                f"'{route.name}' may not serve: {route.denial}",
                type_="permission_error",
                code="deployment_not_permitted",
            )

    async def run_hooks(self, *, caller: Caller, route: Route, endpoint: str, body: dict[str, Any]) -> bytes:
        """The body to forward, once every hook let it pass (only called when there are hooks)."""
        context = HookContext(caller=caller, route=route, endpoint=endpoint, body=body)
        for hook in self.hooks:
            refusal = await hook(context)
            if refusal is not None:
                self.metrics.rejected.labels("hook").inc()
                raise GatewayError(
                    refusal.status, refusal.message, type_="permission_error", code=refusal.code
                )
        return orjson.dumps(context.body)
