from dlq import retry
from pipeline.contract import next_hop_headers
from pipeline.settings import RetryPolicy


def test_backoff_doubles_up_to_the_cap():
    policy = RetryPolicy(topic="t", backoff_s=1, backoff_max_s=5)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_retry_headers_keep_the_first_origin_across_attempts():
    first = retry.origin((("lineage-id", b"L"),), "iot.parsed", 3, 42, 1000)
    assert first.first_failed_at_ms is None
    h1 = retry.retry_headers((("lineage-id", b"L"),), first, 1, 5000, "unknown_device", "m", 4000)
    again = retry.origin(h1, "iot.enrich.retry", 0, 7, 9999)
    assert (again.topic, again.partition, again.offset, again.timestamp_ms) == (
        "iot.parsed",
        3,
        42,
        1000,
    )
    assert again.first_failed_at_ms == 4000
    h2 = retry.retry_headers(h1, again, 2, 8000, "unknown_device", "m", 6000)
    assert retry.attempts(h2) == 2 and retry.due_at_ms(h2) == 8000
    assert [k for k, _ in h2].count(retry.ATTEMPTS) == 1
    assert dict(h2)[retry.FIRST_FAILED_AT] == b"4000"
    assert dict(h2)["lineage-id"] == b"L"


def test_a_stage_output_carries_no_retry_headers():
    headers = retry.retry_headers((), retry.origin((), "t", 0, 1, 2), 1, 3, "r", "m", 4)
    out = next_hop_headers(dict(headers), "reading/1")
    assert not [k for k, _ in out if k.startswith("retry.")]


def test_garbage_retry_headers_read_as_no_retry():
    headers = ((retry.ATTEMPTS, b"x"), (retry.DUE_AT, b""))
    assert retry.attempts(headers) == 0 and retry.due_at_ms(headers) == 0
    assert retry.origin(headers, "t", 1, 2, 3).topic == "t"
