"""Every option's default lives in ``runner.settings`` and nowhere else: what ``--help`` shows
is the dataclass default, and the settings the CLI builds carry it."""

from __future__ import annotations

import dataclasses
import re

import click
import pytest
from click.testing import CliRunner

from runner import settings
from runner.cli import _run_settings, main

# run's options that carry a settings default, and where that default lives
RUN_DEFAULTS = {
    "concurrency": (settings.Limits, "concurrency"),
    "max_attempts": (settings.Retry, "max_attempts"),
    "backoff_base": (settings.Retry, "backoff_base"),
    "backoff_max": (settings.Retry, "backoff_max"),
    "max_wait": (settings.Retry, "max_wait"),
    "outage_limit": (settings.Retry, "outage_limit"),
    "timeout": (settings.Transport, "timeout"),
    "flex_timeout": (settings.Transport, "flex_timeout"),
    "grace": (settings.Stopping, "grace"),
    "heartbeat_ttl": (settings.Stopping, "heartbeat_ttl"),
    "via": (settings.RunSettings, "via"),
    "batch_requests": (settings.Batching, "requests_per_batch"),
    "poll_interval": (settings.Batching, "poll_interval"),
    "deadline_margin": (settings.Deadline, "margin"),
    "deadline_slack": (settings.Deadline, "slack"),
    "deadline_cancel": (settings.Deadline, "cancel"),
}


def _default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _help(*command: str) -> str:
    return CliRunner().invoke(main, [*command, "--help"], terminal_width=200).output


@pytest.mark.parametrize("option", sorted(RUN_DEFAULTS))
def test_each_run_default_shown_in_help_is_the_settings_default(option: str) -> None:
    cls, name = RUN_DEFAULTS[option]
    flag = "--" + option.replace("_", "-")
    help_text = " ".join(_help("run").split())
    shown = re.search(re.escape(flag) + r"[ ,][^\[]*\[[^\]]*default: ([^;\]]+)[;\]]", help_text)
    assert shown is not None, flag
    assert shown.group(1).strip() == str(_default(cls, name))


def test_every_run_option_with_a_default_is_accounted_for() -> None:
    run = main.commands["run"]
    unset = click.Option(["--x"]).default
    with_defaults = {
        p.name
        for p in run.params
        if isinstance(p, click.Option) and not p.is_flag and p.default not in (None, unset)
    }
    assert with_defaults - {"db"} == set(RUN_DEFAULTS)
    assert next(p for p in run.params if p.name == "db").default == settings.DEFAULT_DB


def test_the_settings_the_cli_builds_carry_the_defaults() -> None:
    run = main.commands["run"]
    ctx = run.make_context("run", ["job.jsonl", "--cap", "1"])
    built = _run_settings(ctx.params)
    assert built.limits == settings.Limits()
    assert built.retry == settings.Retry()
    assert built.transport == settings.Transport()
    assert built.stopping == settings.Stopping()
    assert built.batching == settings.Batching()
    assert built.deadline == settings.Deadline()
    assert built.via == "sync"


def test_every_command_explains_every_option_and_shows_one_example() -> None:
    for name, command in main.commands.items():
        text = _help(name)
        assert "Example: batchrun " in text, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts[0]} has no help"


def test_the_command_list_shows_whole_summaries() -> None:
    text = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    for name, command in main.commands.items():
        summary = (command.help or "").split("\n\n")[0].replace("\n", " ").strip()
        flat = " ".join(text.split())
        assert summary in flat, name
    assert "..." not in text.split("Commands:")[1]
