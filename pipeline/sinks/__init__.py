"""Built-in sinks: stages whose effect is outside Kafka, used like any other stage.

* ``postgres`` (:mod:`pipeline.sinks.postgres`): records upserted into a table by
  key and version, one transaction per batch, committed before the offsets;
* ``parquet`` (:mod:`pipeline.sinks.parquet`): records into Parquet files (a
  directory or an object store), partitioned, rolled by size and time, each file
  named after its offset range and committed atomically.

::

    uses: pipeline.sinks:postgres      # or pipeline.sinks:parquet

Both store JSON records as rows of typed columns (:mod:`pipeline.sinks.rows`;
aggregate windows by default) and give every record a ``stored`` lineage hop.
"""

from pipeline.sinks.parquet import ParquetConfig, parquet
from pipeline.sinks.postgres import PostgresConfig, postgres
from pipeline.sinks.rows import AGGREGATE_COLUMNS, AGGREGATE_KEY, RowModel

__all__ = [
    "AGGREGATE_COLUMNS",
    "AGGREGATE_KEY",
    "ParquetConfig",
    "PostgresConfig",
    "RowModel",
    "parquet",
    "postgres",
]
