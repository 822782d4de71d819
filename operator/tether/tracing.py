"""OpenTelemetry tracing: one trace per reconcile, a span per backend call; off by default.

Tracing is on only when the standard variables ask for it:
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, or
``OTEL_TRACES_EXPORTER=otlp`` (``OTEL_SDK_DISABLED=true`` wins over all of them).
Then :func:`configure` imports the SDK and the OTLP HTTP/protobuf exporter, which
read the rest of the ``OTEL_*`` variables themselves (endpoint, headers, timeout,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, batching).

Off costs nothing: this module imports nothing from ``opentelemetry`` at import
time, and every helper below returns a shared do-nothing object after one check of
a module global. The call sites stay the same either way:

* :func:`span` opens a span (the root of a reconcile's trace, in the Controller);
* :func:`child` and :func:`traced` open a span only inside a trace, so the backend
  watchers' long polls, which belong to no reconcile, make no traces of their own;
* :func:`annotate` adds attributes to the current span (a reconcile's result is
  known only at its end);
* :func:`current_ids` gives the trace and span IDs for the JSON log lines.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: What an attribute may hold (OTel takes these scalar types).
Attr = str | bool | int | float

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
#: Bound on flushing the last spans at a stop: the whole stop has 1.8 s (running.STOP_GRACE_SECONDS).
SHUTDOWN_SECONDS = 0.5

# The SDK's tracer and provider while tracing is on; None means off (the only
# state the hot paths look at).
_tracer: Any = None
_provider: Any = None
# opentelemetry.trace and opentelemetry.context, kept once imported (hot paths).
_trace: Any = None
_context: Any = None


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return False
    return "otlp" in exporters or any(env.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def enabled() -> bool:
    return _tracer is not None


def configure(environ: Mapping[str, str] | None = None, *, exporter: Any = None) -> bool:
    """Turn tracing on if the environment asks (or an ``exporter`` is given); return whether on.

    ``exporter`` (a SpanExporter) replaces the OTLP one and is fed synchronously:
    tests pass the SDK's in-memory exporter.
    """
    global _tracer, _provider, _trace, _context
    if _tracer is not None:
        return True
    if exporter is None and not wanted(environ):
        return False
    # Imported here, and only here: with tracing off none of this is loaded.
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from tether import __version__

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win.
    resource = Resource.create({"service.name": "tether", "service.version": __version__})
    # No atexit hook: the process's stop is bounded (running.STOP_GRACE_SECONDS),
    # and an unreachable receiver must not hold the exit up; see shutdown().
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Spans leave in batches from the processor's own (daemon) thread, never
        # from the event loop.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _trace, _context = trace, context
    _provider = provider
    _tracer = provider.get_tracer("tether")
    return True


def shutdown(timeout: float = SHUTDOWN_SECONDS) -> None:
    """Send the spans still queued, waiting at most ``timeout`` seconds; tracing is off after."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is None:
        return
    # The SDK's shutdown waits for an export in flight without a bound of its
    # own: run it in a daemon thread and stop waiting after the timeout.
    worker = threading.Thread(
        target=lambda: (provider.force_flush(int(timeout * 1000)), provider.shutdown()),
        name="tracing-shutdown", daemon=True,
    )
    worker.start()
    worker.join(timeout)


class _NoSpan:
    """What every helper returns while tracing is off, or outside a trace: does nothing."""

    __slots__ = ()

    def set(self, key: str, value: Attr) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    async def __aenter__(self) -> _NoSpan:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


_NO_SPAN = _NoSpan()


class _Span:
    """One open span, current for its ``with`` block (sync or async) in this task."""

    __slots__ = ("_attrs", "_name", "_span", "_token")

    def __init__(self, name: str, attrs: Mapping[str, Attr]) -> None:
        self._name = name
        self._attrs = dict(attrs)
        self._span: Any = None
        self._token: Any = None

    def set(self, key: str, value: Attr) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def __enter__(self) -> _Span:
        self._span = _tracer.start_span(self._name, attributes=self._attrs)
        self._token = _context.attach(_trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span, self._span = self._span, None
        _context.detach(self._token)
        if exc is not None:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.record_exception(exc)
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, str(exc)[:300]))
        span.end()

    async def __aenter__(self) -> _Span:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


Span = _Span | _NoSpan


def span(name: str, /, **attrs: Attr) -> Span:
    """A span named ``name`` with ``attrs``, current inside its ``with``/``async with`` block.

    Outside any trace it starts one (a reconcile's root).
    """
    if _tracer is None:
        return _NO_SPAN
    return _Span(name, attrs)


def _in_trace() -> bool:
    return bool(_trace.get_current_span().is_recording())


def child(name: str, /, **attrs: Attr) -> Span:
    """Like :func:`span`, but only inside a trace: a backend call outside a reconcile is not traced."""
    if _tracer is None or not _in_trace():
        return _NO_SPAN
    return _Span(name, attrs)


def traced(
    describe: Callable[..., tuple[str, Mapping[str, Attr]]],
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async function so each call inside a trace is a child span.

    ``describe`` gets the call's arguments and returns the span's name and
    attributes; it runs only when there is a span to describe. One line above a
    client's central request function, so its body stays as it is.
    """

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if _tracer is None or not _in_trace():
                return await fn(*args, **kwargs)
            name, attrs = describe(*args, **kwargs)
            with _Span(name, attrs):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate


def annotate(**attrs: Attr) -> None:
    """Set ``attrs`` on the current span, if there is one."""
    if _tracer is None:
        return
    current = _trace.get_current_span()
    if current.is_recording():
        current.set_attributes(attrs)


def current_ids() -> tuple[str, str] | None:
    """(trace ID, span ID) of the current span in the usual hex form; None outside a trace."""
    if _tracer is None:
        return None
    ctx = _trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
