"""Reusable stages: configure them in pipeline.yaml or in Python.

* ``windowed`` / :func:`window_stage`: event-time windowed aggregation (tumbling or
  hopping; count, sum, min, max, mean, first, last and reducers of your own).
"""

from pipeline.operators.window import Reducer, WindowConfig, window_stage, windowed

__all__ = ["Reducer", "WindowConfig", "window_stage", "windowed"]
