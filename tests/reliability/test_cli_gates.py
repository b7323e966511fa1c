"""S3: destructive CLI commands change nothing unless explicitly told to.

The behaviour against a broker is tested in tests/integration:
- ``pipeline replay`` without ``--execute`` plans and changes no offset
  (test_rewind.py::test_by_duration_dry_run_changes_nothing_and_execute_moves_the_group);
- ``pipeline dlq purge`` without ``--yes`` is a dry run that moves no floor
  (test_dlq_cli.py::test_purge_hides_dead_letters_below_the_floor);
- ``pipeline dlq replay --dry-run`` sends nothing
  (test_dlq_cli.py::test_replay_dry_run_then_replay).
Here, without a broker: the gates exist and default to the safe side, so a
refactoring cannot quietly turn a dry run into an action.
"""

from __future__ import annotations

import click

from pipeline.cli.main import cli


def _command(*path: str) -> click.Command:
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group), path
        cmd = cmd.commands[name]
    return cmd


def _flag(cmd: click.Command, name: str) -> click.Option:
    [option] = [p for p in cmd.params if p.name == name]
    assert isinstance(option, click.Option) and option.is_flag, (cmd.name, name)
    return option


def test_destructive_commands_are_dry_runs_unless_confirmed():
    assert _flag(_command("replay"), "execute").default is False
    assert _flag(_command("dlq", "purge"), "yes").default is False
    assert _flag(_command("dlq", "replay"), "dry_run").default is False  # sending is additive
    for path in (("replay",), ("dlq", "purge")):
        text = _command(*path).get_help(click.Context(_command(*path)))
        assert "dry run" in text.lower() or "dry-run" in text.lower(), (path, text)
