"""The closed set of dead-letter reason codes.

==================  ========  ====================================================
reason              stage     meaning
==================  ========  ====================================================
``too_large``       ingest    payload over ``ingest.max_payload_bytes``
``empty``           ingest    empty payload
``decode_error``    parse     not UTF-8 JSON object / CSV line of six fields
``schema_violation`` parse    a field is missing, has the wrong type, or is empty
``out_of_range``    parse     ts outside sane bounds, value outside a metric's range
``unknown_device``  enrich    device_id not in the registry after every retry
                              (``stages.enrich.retry.max_attempts``)
``late``            aggregate reading for a window that was already emitted
                              and is no longer remembered as counting it
==================  ========  ====================================================

Not dead letters: a repeat of a reading already counted (same lineage id) is
dropped and counted in ``pipeline_duplicates_dropped_total``; a record that may
succeed later waits in the stage's retry topic (:mod:`dlq.retry`).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    DECODE_ERROR = "decode_error"
    SCHEMA_VIOLATION = "schema_violation"
    OUT_OF_RANGE = "out_of_range"
    UNKNOWN_DEVICE = "unknown_device"
    LATE = "late"
