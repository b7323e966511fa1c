"""A second pipeline on the framework's public API: gateways that batch several
metrics per message (see ../README.md). Nothing here is known to the framework;
pipeline.yaml names these stages with ``uses:``."""
