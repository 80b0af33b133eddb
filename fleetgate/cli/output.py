"""``--format {text,json}`` for commands that print a result: one helper so every command
offers it the same way and says in ``--help`` what its JSON holds.

Errors stay ``fleetgate: error:`` lines on standard error in either format; the JSON
goes to standard output only when the command did its work.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_format(parser: argparse.ArgumentParser, json_help: str, *, text: str = "a line") -> None:
    """Add ``--format {text,json}`` (default text); ``json_help`` says what the JSON holds,
    ``text`` what the default prints."""
    parser.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help=f"json: {json_help} (default text: {text})",
    )


def print_json(doc: Any) -> None:
    """``doc`` as indented JSON on standard output, as the other ``--format json`` do."""
    print(json.dumps(doc, indent=2), flush=True)
