"""The doors devices use: an HTTP gateway and an MQTT bridge in front of the entry
stage (ingest in the built-in pipeline).

Both write what any producer of the entry stage's input writes — the raw bytes of
one reading, keyed by device id, partitioned with murmur2 — and acknowledge a
reading to its sender only once Kafka acknowledged it:

* :mod:`pipeline.edge.http` — ``pipeline serve-http``: ``POST /v1/readings``;
* :mod:`pipeline.edge.mqtt` — ``pipeline bridge-mqtt``: QoS 1 subscriptions;
* :mod:`pipeline.edge.split` — bodies into records (pure);
* :mod:`pipeline.edge.auth` — hashed bearer tokens bound to device-id prefixes;
* :mod:`pipeline.edge.writer` — the target topic, the broker probe, acknowledged writes;
* :mod:`pipeline.edge.mosquitto` — a Mosquitto of its own for the demo, tests, bench.

Reasons a door refuses something (``pipeline_edge_rejected_total{door,reason}``):
"""

REJECT_REASONS = (
    "unauthorized",  # http 401
    "forbidden",  # http 403: a device outside the token's prefix
    "unsupported",  # http 415
    "bad_body",  # http 400
    "too_large",  # http 413; mqtt: over edge.mqtt.max_payload_bytes
    "too_many_records",  # http 413
    "timeout",  # http 408
    "overloaded",  # http 429
    "unavailable",  # http 503
    "refused",  # mqtt: Kafka refused the record for good
)
