"""alert: one window in; zero or one alert out (a filter with its own reason)."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel

from pipeline import Emit, InvalidMessage, Record, StageContext, stage


class AlertConfig(BaseModel):
    threshold: float
    metric: str | None = None  # only windows of this metric; None: all


@stage(config=AlertConfig, reasons={"no_mean": "a window without a mean"})
def alert(record: Record, ctx: StageContext) -> Iterator[Emit]:
    """One aggregate window in; zero or one alert out."""
    window = record.json()
    if "mean" not in window:
        raise InvalidMessage("no_mean", "window has no mean")
    config: AlertConfig = ctx.config
    if config.metric is not None and window.get("metric") != config.metric:
        return
    if window["mean"] > config.threshold:
        yield Emit(key=record.key, value=record.value, schema="alert/1")
