from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import contract
from pipeline.obs import tracing
from stages.parse import parse
from tests.unit.records import Batchwise, engine, reading, rec


def ParseStage() -> Batchwise:
    return Batchwise(engine(parse, stage_id="parse"))


def test_without_an_sdk_tracing_is_off_and_outputs_still_carry_a_child_traceparent():
    assert not tracing.active()  # the API's default provider records nothing
    parent = contract.new_traceparent()
    out = ParseStage().process([rec(reading(), headers=(("traceparent", parent.encode()),))])
    child = contract.header_map(out.outputs[0].headers)["traceparent"].decode()
    assert child.split("-")[1] == parent.split("-")[1]  # same trace
    assert child.split("-")[2] != parent.split("-")[2]  # a new span


def test_with_an_sdk_each_output_gets_a_span_that_is_a_child_of_its_input():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parents = [contract.new_traceparent() for _ in range(3)]
    records = [
        rec(reading(seq=i), headers=(("traceparent", p.encode()), ("lineage-id", b"L%d" % i)))
        for i, p in enumerate(parents)
    ]
    result = ParseStage().process(records)
    tracing.stage_spans(provider.get_tracer("test"), "parse", records, result, 1)
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    for span, parent, out in zip(spans, parents, result.outputs, strict=True):
        _, trace_id, span_id, _ = parent.split("-")
        assert span.name == "parse"
        assert format(span.context.trace_id, "032x") == trace_id
        assert span.parent is not None and format(span.parent.span_id, "016x") == span_id
        assert span.attributes["messaging.destination.name"] == "in"
        written = contract.header_map(out.headers)["traceparent"].decode()
        assert written.split("-")[1:3] == [trace_id, format(span.context.span_id, "016x")]
