"""Dead-letter reason codes.

A reason is a short ``snake_case`` code that says why a record is a dead letter;
it is the ``dlq.reason`` header and the ``reason`` label of
``pipeline_dlq_records_total``. Each stage declares the codes it raises
(``@stage(reasons={code: meaning})``), which keeps the label's values bounded; the
framework's own, below, are declared for every stage.

Not dead letters: a repeat of a record already handled (same lineage id) is
dropped and counted in ``pipeline_duplicates_dropped_total``; a record that may
succeed later waits in the stage's retry topic (:mod:`dlq.retry`).
"""

from __future__ import annotations

import re
from types import MappingProxyType

#: what a reason code looks like (it is a metric label value)
REASON_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

PROCESSING_ERROR = "processing_error"
UNWRITABLE = "unwritable"
LATE = "late"
DECODE_ERROR = "decode_error"
STATE_UNREADABLE = "state_unreadable"

#: the framework's reasons, declared for every stage
FRAMEWORK = MappingProxyType(
    {
        PROCESSING_ERROR: "stage code raised an unexpected exception (on_error: dead_letter)",
        UNWRITABLE: "the broker refused the record for good (too large, invalid)",
        LATE: "for state already emitted: a closed event-time window, or an ended backfill lane",
        DECODE_ERROR: "not the payload the stage reads (not JSON, not UTF-8)",
        STATE_UNREADABLE: "a record of the stage's state changelog that could not be read "
        "when loaded: moved here and deleted from the state (what it held starts empty)",
    }
)
