"""Finding a stage's code from its ``uses:`` in pipeline.yaml.

``uses: package.module:attr`` imports ``package.module`` (the directories under
the config's ``paths:`` are searched first, then the installed packages) and takes
``attr`` (dotted for nested names). ``uses: name`` (no colon) is an entry point
of group ``pipeline.stages`` that an installed package registers::

    [project.entry-points."pipeline.stages"]
    alert = "mypkg.alerts:alert"

The object must be a :class:`~pipeline.stage.StageDef` (what ``@stage`` makes).
Every failure is a ConfigError naming the stage and what to do.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.stage import StageDef

ENTRY_POINT_GROUP = "pipeline.stages"


def _with_paths(paths: Sequence[Path]) -> None:
    for path in reversed([str(p) for p in paths]):
        if path not in sys.path:
            sys.path.insert(0, path)


def _entry_point(stage_id: str, name: str) -> Any:
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise ConfigError(
            f"stages.{stage_id}.uses: no stage {name!r} in entry points {ENTRY_POINT_GROUP!r}; "
            "use package.module:attr or install the package that provides it"
        )
    try:
        return found[0].load()
    except Exception as exc:
        raise ConfigError(
            f"stages.{stage_id}.uses: entry point {name!r} failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def resolve(stage_id: str, uses: str, paths: Sequence[Path] = ()) -> StageDef:
    """The stage ``uses`` names; ConfigError with one line if it cannot be found."""
    _with_paths(paths)
    if ":" not in uses:
        obj = _entry_point(stage_id, uses)
    else:
        module_name, _, attr = uses.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"stages.{stage_id}.uses: cannot import {module_name!r} ({exc}); install the "
                "package or list its directory under paths: in pipeline.yaml"
            ) from None
        except Exception as exc:
            raise ConfigError(
                f"stages.{stage_id}.uses: importing {module_name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ConfigError(
                    f"stages.{stage_id}.uses: {module_name!r} has no attribute {attr!r}"
                ) from None
    if not isinstance(obj, StageDef):
        raise ConfigError(
            f"stages.{stage_id}.uses: {uses!r} is a {type(obj).__name__}, not a stage; "
            "decorate it with @pipeline.stage"
        )
    return obj
