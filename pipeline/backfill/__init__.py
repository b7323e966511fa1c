"""The orchestrated backfill controller: one process owns a bounded run.

The live path is choreography: each stage reacts to its topic, nobody knows
where "the end" is. A backfill (re-running last month after a bug fix, loading
an archive) is orchestration, and this package is its one owner:

* :mod:`.source` plans the input (Parquet files, or a Kafka offset/time range)
  into deterministic chunks from metadata, and reads one chunk at a time (one
  Parquet row group in memory at most);
* :mod:`.state` keeps each run's durable state (spec, chunks done, end offsets,
  verdict) on a compacted topic, so any machine can ``status``/``resume``/``cancel``
  it and a killed controller (or a restarted Kubernetes Job) resumes without
  re-sending finished chunks;
* :mod:`.controller` produces the chunks through the ingest stage's own code into
  the entry stage's backfill lane (rate-limited, checkpointed), then waits for the
  downstream stages' committed offsets to pass what it produced (:mod:`.completion`),
  ends the run's windows in the aggregate with an end-of-input record, and only
  then declares the run COMPLETE.

The stages do not know about runs except in two places: the parse worker's lane
agent (live input goes first) and the aggregate's per-run lane (own watermark and
windows, closed by the end-of-input record).
"""
