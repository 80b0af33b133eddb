"""Inline commands (what telnet and ``nc`` send): split like valkey 9.1's
``sdsnsplitargs`` and re-encode as RESP, so the server always sees multibulk (pure).

The grammar, as the server applies it to one line (its final ``\\r`` dropped):

* an argument ends at a space, tab or CR; blanks before an argument (those and also
  vertical tab and form feed) are skipped, so a vertical tab inside a word stays in it;
* within an argument, ``"..."`` and ``'...'`` sections are joined to what is around
  them, as in a shell: ``set \"\"\"k\"\"\" v`` sets ``k``, ``a"b c"d`` is ``ab cd``;
* in double quotes ``\\xHH`` is a byte, ``\\n \\r \\t \\b \\a`` the control characters and
  ``\\`` before any other byte that byte; in single quotes only ``\\'`` is an escape. An
  escape needs one more byte on the line after the escaped one, so a line ending in
  ``"a\\"`` is ``a\\`` and not an unclosed quote;
* a quote left open is "unbalanced quotes in request".
"""

from __future__ import annotations

from fleetgate.resp import encode_command as encode_command  # the one encoder, re-exported

from .errors import ProtocolError

_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_BLANKS = frozenset(b" \t\n\r\x0b\x0c")
_SEPARATORS = frozenset(b" \t\r\n")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def split_args(line: bytes) -> list[bytes]:
    """Arguments of one inline line (without its ``\\n``); quotes and escapes as the
    server reads them."""
    if line[-1:] == b"\r":
        line = line[:-1]
    if b'"' not in line and b"'" not in line:
        if b"\x0b" not in line and b"\x0c" not in line:
            return line.split()
        words = line.replace(b"\t", b" ").replace(b"\r", b" ").split(b" ")
        return [arg for word in words if (arg := word.lstrip(b"\x0b\x0c"))]
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _BLANKS:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        while i < n and line[i] not in _SEPARATORS:
            c = line[i]
            i += 1
            if c == 34:  # a double-quoted section
                while True:
                    if i >= n:
                        raise ProtocolError("unbalanced quotes in request")
                    c = line[i]
                    if c == 92 and i + 2 < n:  # backslash
                        escaped = line[i + 1]
                        if (
                            escaped == 120  # 'x'
                            and i + 3 < n
                            and line[i + 2] in _HEX
                            and line[i + 3] in _HEX
                        ):
                            cur.append(int(line[i + 2 : i + 4], 16))
                            i += 4
                        else:
                            cur.append(_ESCAPES.get(escaped, escaped))
                            i += 2
                    elif c == 34:
                        i += 1
                        break
                    else:
                        cur.append(c)
                        i += 1
            elif c == 39:  # a single-quoted section
                while True:
                    if i >= n:
                        raise ProtocolError("unbalanced quotes in request")
                    c = line[i]
                    if c == 92 and i + 2 < n and line[i + 1] == 39:
                        cur.append(39)
                        i += 2
                    elif c == 39:
                        i += 1
                        break
                    else:
                        cur.append(c)
                        i += 1
            else:
                cur.append(c)
        args.append(bytes(cur))
