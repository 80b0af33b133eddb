"""The common case of the request grammar in C (_scan.c; see framing.py)."""

def command(
    data: bytes, p: int, max_count: int, max_length: int, /
) -> tuple[list[bytes], int] | None: ...
def commands(
    data: bytes,
    p: int,
    out: list[tuple[list[bytes], bytes]],
    max_count: int,
    max_length: int,
    /,
) -> int: ...
