"""The command table, learned from the server (pure once loaded).

``COMMAND`` answers, per command (and per subcommand, named ``container|sub``): its
arity, flags, the legacy first/last/step key positions, its tips and its key
specifications. A key spec says where the keys start (``begin_search``: a fixed
``index``, or after a ``keyword`` searched from ``startfrom``) and how many follow
(``find_keys``: a ``range`` up to ``lastkey`` every ``keystep``, with ``limit`` splitting
the rest; or ``keynum``: a count argument at ``keynumidx``, keys from ``firstkey``).
:meth:`CommandTable.key_positions` applies them exactly as the server's
``getKeysUsingKeySpecs`` does, and falls back to first/last/step for engines that send
no key specs. Nothing here is a hand-kept list of commands.

Specs of type ``unknown`` (``SORT ... STORE``, the BY/GET patterns) give no positions:
the command is routed by the keys that are known, and the server itself refuses with
``CROSSSLOT`` or redirects when an unknown key lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .resp import Status, Value


@dataclass(frozen=True, slots=True)
class KeySpec:
    begin: str
    """``index``, ``keyword`` or ``unknown``."""
    index: int = 0
    keyword: bytes = b""
    startfrom: int = 0
    find: str = "unknown"
    """``range``, ``keynum`` or ``unknown``."""
    lastkey: int = 0
    keystep: int = 1
    limit: int = 0
    keynumidx: int = 0
    firstkey: int = 0


@dataclass(frozen=True, slots=True)
class CommandInfo:
    name: str
    """Lower case, ``container|sub`` for subcommands."""
    arity: int
    flags: frozenset[str]
    first: int
    last: int
    step: int
    tips: frozenset[str] = frozenset()
    specs: tuple[KeySpec, ...] = ()
    subcommands: Mapping[str, CommandInfo] = field(default_factory=dict)


def _text(value: Value) -> str:
    if isinstance(value, Status):
        return value.text.decode()
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _pairs(value: Value) -> dict[str, Value]:
    """A RESP2 flat key/value list (or a RESP3 map) as a dict with str keys."""
    if isinstance(value, dict):
        return {_text(k): v for k, v in value.items()}
    if not isinstance(value, list):
        return {}
    return {_text(value[i]): value[i + 1] for i in range(0, len(value) - 1, 2)}


def _int(value: Value, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def parse_spec(value: Value) -> KeySpec:
    spec = _pairs(value)
    begin, find = _pairs(spec.get("begin_search")), _pairs(spec.get("find_keys"))
    bspec, fspec = _pairs(begin.get("spec")), _pairs(find.get("spec"))
    keyword = bspec.get("keyword")
    return KeySpec(
        begin=_text(begin.get("type", b"unknown")),
        index=_int(bspec.get("index")),
        keyword=keyword.upper() if isinstance(keyword, bytes) else b"",
        startfrom=_int(bspec.get("startfrom")),
        find=_text(find.get("type", b"unknown")),
        lastkey=_int(fspec.get("lastkey")),
        keystep=_int(fspec.get("keystep"), 1) or 1,
        limit=_int(fspec.get("limit")),
        keynumidx=_int(fspec.get("keynumidx")),
        firstkey=_int(fspec.get("firstkey")),
    )


def parse_command(entry: Value) -> CommandInfo | None:
    """One element of ``COMMAND`` / ``COMMAND INFO``; None for a nil (unknown name)."""
    if not isinstance(entry, list) or len(entry) < 6:
        return None
    flags = entry[2] if isinstance(entry[2], list) else []
    tips = entry[7] if len(entry) > 7 and isinstance(entry[7], list) else []
    specs = entry[8] if len(entry) > 8 and isinstance(entry[8], list) else []
    subs = entry[9] if len(entry) > 9 and isinstance(entry[9], list) else []
    children = {}
    for sub in subs:
        info = parse_command(sub)
        if info is not None:
            children[info.name.split("|", 1)[-1]] = info
    return CommandInfo(
        name=_text(entry[0]).lower(),
        arity=_int(entry[1]),
        flags=frozenset(_text(f).lower() for f in flags),
        first=_int(entry[3]),
        last=_int(entry[4]),
        step=_int(entry[5]),
        tips=frozenset(_text(t).lower() for t in tips),
        specs=tuple(parse_spec(s) for s in specs),
        subcommands=children,
    )


class CommandTable:
    """Every command the server knows, from its ``COMMAND`` reply."""

    def __init__(self, commands: Sequence[CommandInfo]) -> None:
        self.commands = {info.name: info for info in commands}
        self.single: dict[bytes, int] = {
            name.encode(): info.specs[0].index
            for name, info in self.commands.items()
            if not info.subcommands and len(info.specs) == 1
            and info.specs[0].begin == "index" and info.specs[0].find == "range"
            and info.specs[0].lastkey == 0 and info.specs[0].index > 0
        }  # fmt: skip
        """Lower-case name -> where its one key is, for commands with exactly one key
        (GET, SET, HSET...): the common case made cheap. Valid when the command has
        that many arguments; :meth:`key_positions` otherwise."""
        self.simple: dict[str, tuple[int, int]] = {
            name.upper(): (self.commands[name].arity, index)
            for name, index in ((n.decode(), i) for n, i in self.single.items())
        }
        """Upper-case name -> (arity, where its one key is), for the same commands: a
        client command found here by its name, with a number of arguments its arity
        allows and its key among them, needs no other lookup to be routed."""

    @classmethod
    def from_reply(cls, reply: Value) -> CommandTable:
        if not isinstance(reply, list):
            raise ValueError("COMMAND did not answer with a list")
        return cls([info for entry in reply if (info := parse_command(entry)) is not None])

    def __len__(self) -> int:
        return len(self.commands)

    def lookup(self, args: Sequence[bytes]) -> CommandInfo | None:
        """The command (or subcommand) ``args`` invoke; None when the server does not
        know it."""
        info = self.commands.get(args[0].decode("latin-1").lower())
        if info is not None and info.subcommands and len(args) > 1:
            sub = info.subcommands.get(args[1].decode("latin-1").lower())
            if sub is not None:
                return sub
        return info

    def wrong_arity(self, args: Sequence[bytes]) -> str | None:
        """The command's name as the server spells it (``mset``, ``client|setname``)
        when ``args`` has a number of arguments the server refuses by the command's
        arity, else None (an unknown command or subcommand is the server's to name)."""
        info = self.lookup(args)
        if info is None or (info.subcommands and len(args) > 1):
            return None
        argc, arity = len(args), info.arity
        if argc == arity or (arity < 0 and argc >= -arity):
            return None
        return info.name

    def key_positions(self, args: Sequence[bytes]) -> list[int]:
        """Where the keys of ``args`` are (indexes into ``args``), in order."""
        info = self.lookup(args)
        if info is None:
            return []
        return key_positions(info, args)

    def keys(self, args: Sequence[bytes]) -> list[bytes]:
        return [args[i] for i in self.key_positions(args)]


def key_positions(info: CommandInfo, args: Sequence[bytes]) -> list[int]:
    if not info.specs:
        return _legacy(info, len(args))
    argc = len(args)
    out: list[int] = []
    for spec in info.specs:
        first = _begin(spec, args)
        if first <= 0:
            continue
        if spec.find == "range":
            if spec.lastkey >= 0:
                last = first + spec.lastkey
            elif not spec.limit:
                last = argc + spec.lastkey
            else:
                last = first + ((argc - first) // spec.limit + spec.lastkey)
        elif spec.find == "keynum":
            at = first + spec.keynumidx
            if at >= argc:
                continue
            try:
                count = int(args[at])
            except ValueError:
                continue
            if count < 0:
                continue
            first += spec.firstkey
            last = first + count - 1
        else:
            continue
        out.extend(i for i in range(first, last + 1, spec.keystep) if i < argc)
    return list(dict.fromkeys(out))


def _begin(spec: KeySpec, args: Sequence[bytes]) -> int:
    argc = len(args)
    if spec.begin == "index":
        return spec.index
    if spec.begin != "keyword":
        return 0
    start = spec.startfrom if spec.startfrom > 0 else argc + spec.startfrom
    end = argc - 1 if spec.startfrom > 0 else 0
    i = start
    while i != end:
        if i >= argc or i < 1:
            break
        if args[i].upper() == spec.keyword:
            return i + 1
        i = i + 1 if start <= end else i - 1
    return 0


def _legacy(info: CommandInfo, argc: int) -> list[int]:
    if info.first <= 0:
        return []
    last = info.last if info.last >= 0 else argc + info.last
    return list(range(info.first, min(last, argc - 1) + 1, max(info.step, 1)))
