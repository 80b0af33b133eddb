"""Every ``--format`` of the command line says in ``--help`` what its JSON is, and the
commands that print a result offer it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from fleetgate.cli.main import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*path, name))


def _format_option(parser: argparse.ArgumentParser) -> argparse.Action | None:
    return next((a for a in parser._actions if "--format" in a.option_strings), None)


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize(
    "command",
    [
        ("login",),
        ("status",),
        ("db", "ls"),
        ("db", "servers"),
        ("db", "connect"),
        ("sandbox", "up"),
        ("sandbox", "status"),
        ("discovery", "status"),
    ],
    ids=" ".join,
)
def test_result_printing_commands_offer_json(command: tuple[str, ...]) -> None:
    option = _format_option(COMMANDS[command])
    assert option is not None and option.choices is not None and "json" in option.choices


WITHOUT_FORMAT = {
    # Daemons: they serve until stopped and print no result a program would consume.
    ("discovery", "run"),
    ("agent", "run"),
    ("auth", "run"),
    # Prints a shell script to source, not a result.
    ("completion",),
}
"""The only commands without ``--format json``: a new command must offer it (the shared
``fleetgate.cli.output.add_format``) or be added here with the reason."""


def test_every_command_but_the_daemons_and_completion_offers_json() -> None:
    missing = [
        " ".join(command)
        for command, parser in COMMANDS.items()
        if command not in WITHOUT_FORMAT
        and not (
            (option := _format_option(parser)) is not None
            and option.choices is not None
            and "json" in option.choices
        )
    ]
    assert missing == []
    assert COMMANDS.keys() >= WITHOUT_FORMAT  # the allow-list names real commands
    for command in WITHOUT_FORMAT:
        assert _format_option(COMMANDS[command]) is None, command


@pytest.mark.parametrize(
    "command",
    [c for c, p in COMMANDS.items() if _format_option(p) is not None],
    ids=" ".join,
)
def test_every_format_option_documents_its_json(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--format {text,json" in text or "--format {json}" in text
    assert "json: " in text, text
