"""OpenTelemetry spans for the stages, through the OpenTelemetry API only.

Every stage already writes a W3C ``traceparent`` on its outputs that is a child of
its input's (:func:`pipeline.contract.child_traceparent`), so traces connect
across stages with no tracing library at all. When the user configures an
OpenTelemetry SDK (a tracer provider with an exporter, e.g. through
``opentelemetry-instrument`` or their own code), each stage also records a real
span per output record: named after the stage, a child of the input's
``traceparent``, from the batch's start to its processing end, and the output's
``traceparent`` becomes that span's context. With no SDK configured the only cost
is one ``isinstance`` check per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline import contract
from pipeline.engine.result import BatchResult
from pipeline.records import Record

_PROPAGATOR = TraceContextTextMapPropagator()


def active() -> bool:
    """Is a real tracer provider configured (not the API's no-op default)?"""
    return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider | NoOpTracerProvider)


def tracer() -> Tracer:
    return trace.get_tracer("iot-pipeline")


def stage_spans(
    spans: Tracer, stage: str, records: Sequence[Record], result: BatchResult, start_ns: int
) -> None:
    """Record one span per output of a 1:1 stage and point the output's
    ``traceparent`` at it."""
    by_offset = {r.offset: r for r in records}
    for out in result.outputs:
        source = by_offset.get(out.source_offset) if out.source_offset is not None else None
        if source is None:
            continue
        incoming = contract.header_map(source.headers)
        parent = incoming.get(contract.H_TRACEPARENT)
        context = _PROPAGATOR.extract(
            {"traceparent": parent.decode("ascii", "replace")} if parent else {}
        )
        span = spans.start_span(
            stage,
            context=context,
            kind=SpanKind.CONSUMER,
            start_time=start_ns,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": source.topic,
                "messaging.destination.partition.id": str(source.partition),
                "messaging.kafka.offset": source.offset,
                "pipeline.stage": stage,
                "pipeline.lineage_id": incoming.get(contract.H_LINEAGE, b"").decode(
                    "ascii", "replace"
                ),
            },
        )
        span.end()
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        if "traceparent" in carrier:
            out.headers = contract.with_headers(
                dict(out.headers), {contract.H_TRACEPARENT: carrier["traceparent"]}
            )
