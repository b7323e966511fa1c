"""The built-in IoT pipeline: ingest → parse → enrich → aggregate.

Four ordinary stages, written only with the public API (``from pipeline import …``),
exactly as a user writes one: config/pipeline.yaml names them with ``uses:``, and
nothing in the framework names them back.
"""
