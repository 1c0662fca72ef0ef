"""Traces: OpenTelemetry spans across the API, the gateway, the controller, builds and replicas,
exported over OTLP/HTTP when `CONVERGE_OTEL__ENDPOINT` is set, and off otherwise.

Off (the default) costs the gateway's hot path one module-attribute read per place that could
trace: no provider exists, the SDK is not even imported, no `traceparent` is read or written, no
span object is made; `span()` hands back one shared no-op context manager. Call sites on the data
path test `tracing.ENABLED` themselves before building any attribute.

On: one TracerProvider per process, a BatchSpanProcessor (spans leave in batches from its own
thread, never on a request's path) and W3C trace context. A client's `traceparent` is continued,
answers carry the `traceparent` of their server span, and the gateway sends the upstream span's
to the replica, whose server span continues the same trace. Root spans are sampled at
`sample_ratio`; a child follows its parent's decision.

Span names are bounded (route templates such as `GET /deployments/{deployment_id}`, fixed names
such as `gateway.upstream`); ids and names of things go in attributes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

# Read on every request that could trace: keep it a plain module attribute.
ENABLED = False
TRACES_PATH = "/v1/traces"
ENDPOINT_ENV = "CONVERGE_OTEL__ENDPOINT"  # what a replica's environment carries (see serving/common.py)
SAMPLE_RATIO_ENV = "CONVERGE_OTEL__SAMPLE_RATIO"
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
KINDS = ("internal", "server", "client")

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_api: Any = None  # opentelemetry.trace, imported when tracing is switched on
_context: Any = None  # opentelemetry.context
_propagator: Any = None  # W3C trace context
_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT reads)."""
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def configure(
    *,
    endpoint: str | None,
    service_name: str,
    sample_ratio: float = 1.0,
    attributes: Mapping[str, str] | None = None,
) -> bool:
    """Switch tracing on, exporting to `endpoint` over OTLP/HTTP; nothing at all without one.
    Whether tracing is on now."""
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    sampler = ParentBased(root=TraceIdRatioBased(sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    install(provider)
    return True


def configure_from_env(environ: Mapping[str, str], *, service_name: str, **attributes: str) -> bool:
    """A replica's tracing, from what the runtime put in its environment (CONVERGE_OTEL__ENDPOINT,
    CONVERGE_OTEL__SAMPLE_RATIO, OTEL_SERVICE_NAME); off without an endpoint."""
    try:
        ratio = min(1.0, max(0.0, float(environ.get(SAMPLE_RATIO_ENV) or 1.0)))
    except ValueError:
        ratio = 1.0
    return configure(
        endpoint=environ.get(ENDPOINT_ENV) or None,
        service_name=environ.get(SERVICE_NAME_ENV) or service_name,
        sample_ratio=ratio,
        attributes=attributes,
    )


def install(provider: TracerProvider) -> None:
    """Trace through `provider` from now on (configure() builds one; tests pass one with an
    in-memory exporter). The process-wide OpenTelemetry provider is left alone: two apps in one
    process (tests) switch this one back and forth."""
    global ENABLED, _tracer, _provider, _api, _context, _propagator
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _api, _context, _propagator = trace, context, TraceContextTextMapPropagator()
    _provider, _tracer = provider, provider.get_tracer("converge")
    ENABLED = True


def shutdown() -> None:
    """Off again, after the spans still queued are exported (blocking: call it in a thread)."""
    global ENABLED, _tracer, _provider
    provider = _provider
    ENABLED, _tracer, _provider = False, None, None
    if provider is not None:
        provider.shutdown()


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float (and lists of them); None means "not known"."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str | bool | int | float) else str(value)
    return out


def span(name: str, /, **attributes: Any) -> contextlib.AbstractContextManager[Span | None]:
    """`with tracing.span("reconcile", deployment=label) as s:` a child of the current span (or a
    new trace); `s` is None and nothing happens while tracing is off. Attribute names with dots
    go in as `**{"gen_ai.tool.name": name}`."""
    if not ENABLED or _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=_clean(attributes))


class ActiveSpan:
    """A span that is current from start to `end()`, for code whose try/finally already brackets
    the work (ASGI middleware, the gateway's forwarding) where a `with` block would not fit.
    Only made while tracing is on: callers check `ENABLED` first."""

    __slots__ = ("span", "_token")

    def __init__(
        self,
        name: str,
        *,
        kind: str = "internal",
        headers: Iterable[tuple[bytes, bytes]] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        assert _tracer is not None and kind in KINDS
        # A server span continues the caller's trace, or starts a new one: never a child of
        # whatever happened to be current in this task.
        parent = extract(headers) if kind == "server" else None
        span_kind = getattr(_api.SpanKind, kind.upper())
        self.span = _tracer.start_span(
            name, context=parent, kind=span_kind, attributes=_clean(attributes or {})
        )
        self._token = _context.attach(_api.set_span_in_context(self.span, parent))

    def traceparent(self) -> bytes:
        """This span's W3C `traceparent`, for the answer's headers."""
        return _format(self.span).encode()

    def set(self, **attributes: Any) -> None:
        self.span.set_attributes(_clean(attributes))

    def end(self, *, status: int | None = None, name: str | None = None) -> None:
        """End it (an HTTP status, a name known only now such as the matched route); the
        context before start() is current again."""
        try:
            if name is not None:
                self.span.update_name(name)
            if status is not None:
                self.span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    self.span.set_status(_api.Status(_api.StatusCode.ERROR))
            self.span.end()
        finally:
            _context.detach(self._token)


def start(
    name: str,
    *,
    kind: str = "internal",
    headers: Iterable[tuple[bytes, bytes]] | None = None,
    **attributes: Any,
) -> ActiveSpan | None:
    """An ActiveSpan, or None while tracing is off."""
    if not ENABLED:
        return None
    return ActiveSpan(name, kind=kind, headers=headers, attributes=attributes)


def extract(headers: Iterable[tuple[bytes, bytes]] | None) -> Any:
    """The trace context of ASGI headers' `traceparent` (and `tracestate`); an empty context
    (a new trace) without a valid one."""
    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if key == b"traceparent" or key == b"tracestate":
            carrier[key.decode()] = value.decode("latin-1")
    if not carrier:
        return _context.Context()
    return _propagator.extract(carrier, context=_context.Context())


def _format(current: Any) -> str:
    ctx = current.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def traceparent() -> str | None:
    """The current span's `traceparent` (what an outgoing request carries), or None."""
    if not ENABLED:
        return None
    current = _api.get_current_span()
    return _format(current) if current.get_span_context().is_valid else None


def with_traceparent(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers` plus the current span's `traceparent` (a copy; the original is shared)."""
    value = traceparent()
    return {**headers, "traceparent": value} if value else dict(headers)


def ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for logs; None without one."""
    if not ENABLED:
        return None
    ctx = _api.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def parse_traceparent(value: str) -> tuple[str, str] | None:
    """(trace id, parent span id) of a `traceparent` header value, or None when malformed."""
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        if int(parts[1], 16) == 0 or int(parts[2], 16) == 0:
            return None
    except ValueError:
        return None
    return parts[1], parts[2]


def new_traceparent() -> str:
    """A fresh sampled `traceparent` (a client starting a trace: tests, benchmarks)."""
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
