"""Bad input never escapes as an exception: every input becomes an output or a
dead letter with a reason the stage declares (ingest and parse, fuzzed)."""

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.ingest import ingest as ingest_stage
from stages.parse import parse as parse_stage
from tests.unit.records import Batchwise, engine, rec

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
readingish = st.fixed_dictionaries(
    {},
    optional={
        "device_id": json_values,
        "ts": json_values | st.integers(min_value=0, max_value=2**64),
        "seq": json_values,
        "metric": json_values,
        "value": json_values | st.floats(allow_nan=True, allow_infinity=True),
        "unit": json_values,
    },
)
payloads = st.one_of(
    st.binary(max_size=300),
    readingish.map(lambda d: json.dumps(d).encode()),  # stdlib: huge ints, NaN tokens
    st.lists(st.text(max_size=12), min_size=0, max_size=8).map(lambda f: ",".join(f).encode()),
)

REASONS = {*ingest_stage.reasons, *parse_stage.reasons}


@settings(max_examples=300, deadline=None)
@given(st.lists(payloads, max_size=5))
def test_ingest_then_parse_account_for_every_input(values):
    ingest = Batchwise(engine(ingest_stage, {"max_payload_bytes": 256}))
    parse = Batchwise(engine(parse_stage))
    inputs = [rec(v) for v in values]
    first = ingest.process(inputs)
    assert len(first.outputs) + len(first.dead) + first.duplicates == len(inputs)
    second = parse.process(
        [rec(o.value, key=o.key, headers=tuple(o.headers)) for o in first.outputs]
    )
    assert len(second.outputs) + len(second.dead) == len(first.outputs)
    for dead in first.dead + second.dead:
        assert str(dead.reason) in REASONS
        assert dead.error_message
    for out in second.outputs:
        doc = orjson.loads(out.value)
        assert set(doc) == {"device_id", "ts", "seq", "metric", "value", "unit"}
