"""How the server reads the words of a command that are not data: subcommand and option
names, and small integers such as HELLO's protocol version.

The server compares subcommand and option names with ``strcasecmp`` on C strings: ASCII
case does not matter, and a NUL byte ends the word, so ``AUTH\\x00anything`` *is*
``AUTH`` to it (Valkey 9 looks subcommands up the same way: ``CLIENT SETNAME\\x00x``
runs ``CLIENT SETNAME``). Whatever the agent decides on such a word must be decided on
what the server will read, never on the bytes as sent.
"""

from __future__ import annotations

_LLONG_MAX = (1 << 63) - 1


def server_word(arg: bytes) -> bytes:
    """``arg`` as the server compares an option or subcommand name: cut at the first NUL
    byte, ASCII upper case (``b"aUtH\\x00x"`` -> ``b"AUTH"``)."""
    cut = arg.find(b"\x00")
    return (arg if cut < 0 else arg[:cut]).upper()


def parse_long(arg: bytes) -> int | None:
    """A signed 64-bit integer exactly as the server's ``string2ll`` reads one (no sign
    ``+``, no spaces, no leading zeros, no ``_``); None when the server refuses it."""
    if not arg or len(arg) > 20:
        return None
    if arg == b"0":
        return 0
    negative = arg[:1] == b"-"
    digits = arg[1:] if negative else arg
    if not digits or not (49 <= digits[0] <= 57) or not all(48 <= c <= 57 for c in digits):
        return None
    value = int(digits)
    if negative:
        return -value if value <= _LLONG_MAX + 1 else None
    return value if value <= _LLONG_MAX else None
