"""Finding a stage's code from ``uses:``: import paths, ``paths:``, entry points."""

from __future__ import annotations

import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.registry import ENTRY_POINT_GROUP, resolve
from pipeline.stage import StageDef

STAGE_CODE = """
from pipeline import Emit, stage

@stage
def shout(record, ctx):
    return Emit(record.key, (record.value or b"").upper())
"""


def test_a_module_under_paths_is_found_first(tmp_path):
    (tmp_path / "userpkg_a").mkdir()
    (tmp_path / "userpkg_a" / "__init__.py").write_text("")
    (tmp_path / "userpkg_a" / "loud.py").write_text(STAGE_CODE)
    found = resolve("shout", "userpkg_a.loud:shout", [tmp_path])
    assert isinstance(found, StageDef) and found.name == "userpkg_a.loud:shout"


def test_an_entry_point_names_a_stage(tmp_path, monkeypatch):
    (tmp_path / "userpkg_b.py").write_text(STAGE_CODE)
    dist = tmp_path / "userpkg_b-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg-b\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nloud = userpkg_b:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve("shout", "loud").name == "userpkg_b:shout"
    with pytest.raises(ConfigError, match="no stage 'quiet' in entry points"):
        resolve("shout", "quiet")


@pytest.mark.parametrize(
    ("uses", "message"),
    [
        ("no_such_module_x:fn", "cannot import 'no_such_module_x'"),
        ("pipeline.stage:nothing", "has no attribute 'nothing'"),
        ("pipeline.stage:stage", "is a function, not a stage; decorate it with @pipeline.stage"),
    ],
)
def test_every_failure_is_one_line_naming_the_stage(uses, message):
    with pytest.raises(ConfigError) as info:
        resolve("mine", uses)
    assert str(info.value).startswith("stages.mine.uses: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_importing_a_broken_module_says_what_broke(tmp_path):
    (tmp_path / "userpkg_c.py").write_text("raise RuntimeError('half written')\n")
    with pytest.raises(ConfigError, match="importing 'userpkg_c' failed: RuntimeError"):
        resolve("c", "userpkg_c:x", [tmp_path])
    sys.modules.pop("userpkg_c", None)
