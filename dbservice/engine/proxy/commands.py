"""Incremental parser of client commands (pure: it only sees bytes and calls back).

For each command it reads the header, the name and the argument count, asks the hooks,
and forwards the client's ORIGINAL bytes (runs of allowed commands go out in one write).
Arguments are read only for AUTH, HELLO and CLIENT, and for names the agent asks to
inspect; every other argument is skipped by length, so a large value passes through in
the pieces it arrives in and is never held whole. What it keeps between reads is
bounded: a partial count line, a partial name, or a partial inspected command.

Inline commands are split like the server splits them and forwarded re-encoded as RESP.

Inside ``MULTI`` a command the engine answers with an error instead of forwarding (a
hook refusal, a command the engine cannot follow there) never reaches the server's
queue, so the parser marks the transaction failed as the server marks it for a command
it rejects: ``EXEC`` is then answered with the server's ``EXECABORT`` and a ``DISCARD``
goes to the server in its place (its reply kept from the client), so nothing of the
transaction runs. A refused ``EXEC`` is answered as the server answers one it rejects
(``EXECABORT ... because of: <error>``), its transaction discarded likewise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

from .errors import ProtocolError, error_reply
from .framing import (
    NATIVE_SCAN,
    SHORT_LINE,
    bulk_line,
    count_line,
    inline_end,
    short_bulk_ends,
    short_bulks,
    short_counts,
)
from .hooks import Action, Hello, SessionHooks
from .inline import encode_command, split_args
from .pending import Injected, Item, Local, Special, Sub
from .settings import ProxyLimits
from .words import parse_long, server_word

# Commands the engine itself looks at.
_AUTH, _HELLO, _CLIENT, _SUB, _UNSUB, _MULTI, _ENDMULTI, _RESET, _MONITOR = range(1, 10)
_SPECIAL: dict[str, int] = {
    "AUTH": _AUTH,
    "HELLO": _HELLO,
    "CLIENT": _CLIENT,
    "SUBSCRIBE": _SUB,
    "PSUBSCRIBE": _SUB,
    "SSUBSCRIBE": _SUB,
    "UNSUBSCRIBE": _UNSUB,
    "PUNSUBSCRIBE": _UNSUB,
    "SUNSUBSCRIBE": _UNSUB,
    "MULTI": _MULTI,
    "EXEC": _ENDMULTI,
    "DISCARD": _ENDMULTI,
    "RESET": _RESET,
    "MONITOR": _MONITOR,
}
_NEEDS_ARGS = frozenset({_AUTH, _HELLO, _CLIENT})
_INSPECT = 100
"""A name the hooks asked to see the arguments of."""

_NAME_CACHE_MAX = 4096

EXECABORT: Final = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
"""The server's answer to ``EXEC`` after a command of the transaction was rejected."""
_EXECABORT_BECAUSE: Final = b"-EXECABORT Transaction discarded because of: "
"""The server's answer to an ``EXEC`` it rejects (arity, ACL), the error following."""
_DISCARD: Final = b"*1\r\n$7\r\nDISCARD\r\n"


class CommandParser:
    """Feed it what the client sends; it calls ``forward`` with bytes for the server,
    appends to ``pending`` what each forwarded command is owed, and calls ``local`` with
    replies of its own. Raises :class:`ProtocolError` on malformed input (the caller
    sends :attr:`ProtocolError.reply` in turn and closes)."""

    def __init__(
        self,
        *,
        hooks: SessionHooks,
        limits: ProxyLimits,
        forward: Callable[[bytes | memoryview], None],
        local: Callable[[Local], None],
        pending: deque[Item],
        inspect: Iterable[str] = (),
        native: bool = True,
    ) -> None:
        self._hooks = hooks
        self._on_command = hooks.on_command
        self._limits = limits
        self._max_bulk = limits.max_bulk
        self._forward = forward
        self._local = local
        self._pending = pending
        self._special_names = dict(_SPECIAL)
        wanted = {name.upper() for name in inspect}
        self._default_spec: int | None = _INSPECT if "*" in wanted else None
        """``inspect=["*"]``: every command's arguments (the agent's audit trail)."""
        for name in wanted - {"*"}:
            self._special_names.setdefault(name, _INSPECT)
        self._names: dict[bytes, str] = {}
        self._scan = (
            NATIVE_SCAN.command
            if native and NATIVE_SCAN is not None and self._default_spec == _INSPECT
            else None
        )
        """When every command's arguments are read (``inspect=("*",)``): the native
        scanner's whole canonical commands (framing.py), tried first on each command; it
        reads names and values up to ``max_inspect`` (a longer name is the Python
        reader's to refuse), anything else is left to the Python reader below it."""
        self._scan_limits = (limits.max_multibulk, min(limits.max_bulk, limits.max_inspect))
        self._framed_names: dict[bytes, str] = {}
        """Command names as sent with the CR LF after them, canonical (upper case)."""
        self._hot = (
            self._framed_names,
            self._special_names,
            hooks.on_command,
            pending.append,
            limits.max_bulk,
            limits.max_multibulk,
            self._default_spec,
            short_counts(limits.max_multibulk),  # the framing tables of these limits
            short_bulks(min(limits.max_bulk, limits.max_inspect)),  # for command names
            short_bulks(limits.max_bulk),
            short_bulk_ends(limits.max_bulk),
        )
        """What :meth:`feed` reads on every call, none of which changes after this: one
        attribute to load instead of eleven (it counts when each read is a command)."""
        self._rest = b""
        self._args_left = 0
        """Arguments of a command being streamed whose header is not read yet."""
        self._bulk_left = 0
        """Bytes (payload and CRLF) of the current streamed argument still to come."""
        self._dropping = False
        """The command being streamed was refused: its bytes are skipped, not sent."""
        self._in_multi = False
        self._multi_failed = False
        """A command of the current transaction was answered by the engine with an
        error: ``EXEC`` becomes ``DISCARD`` (the server's ``EXECABORT`` to the client)."""
        self._discard_owed = False
        """:meth:`_special` turned an ``EXEC`` into a ``DISCARD`` that :meth:`_refusal`
        writes once what came before it is forwarded."""
        self.held: Awaitable[Sequence[bytes] | None] | None = None
        """After a RESET whose connection the agent logs in again (``on_reset``): what
        it logs in with. Nothing after the RESET is read until :meth:`release`."""
        self.commands = 0
        """Commands seen (forwarded or answered locally)."""
        self.refused = 0

    @property
    def buffered(self) -> int:
        """Bytes held between reads (a partial command header)."""
        return len(self._rest)

    @property
    def at_boundary(self) -> bool:
        """Everything forwarded so far ends with a whole command (what is held back in
        :attr:`buffered` has not been sent): a command of the agent's own may go now."""
        return not self._args_left and not self._bulk_left

    @property
    def in_multi(self) -> bool:
        """The client has sent MULTI and not yet EXEC, DISCARD or RESET."""
        return self._in_multi

    def release(self) -> None:
        """The connection is logged in again after the RESET: go on (``feed(b"")``
        reads what arrived meanwhile)."""
        self.held = None

    # -- the hot path ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.held is not None:  # kept, in order, until the login after RESET is done
            self._rest += data
            return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        n = len(data)
        p = 0
        fwd = 0
        if self._args_left or self._bulk_left:
            p = self._skip(data, 0, n)
            if self._dropping:
                fwd = p
            if self._args_left or self._bulk_left:
                self._finish(data, fwd, p, n)
                return
            self._dropping = False
        (
            framed_names,
            special,
            on_command,
            append,
            max_bulk,
            max_multibulk,
            default_spec,
            counts,
            names_at,
            bulks,
            bulk_end,
        ) = self._hot
        seen = 0
        scan = self._scan
        names = self._names
        max_count, max_length = self._scan_limits
        try:
            while p < n:
                start = p
                if scan is not None and (got := scan(data, p, max_count, max_length)):
                    # A whole command, canonically written: decided with its arguments
                    # as the Python reader's _INSPECT case below decides it.
                    argv, q = got
                    name = names.get(argv[0]) or self._canonical(argv[0])
                    if special.get(name, default_spec) == _INSPECT:
                        seen += 1
                        verdict = on_command(name, len(argv), argv)
                        if verdict is not None:
                            fwd = self._refused(data, fwd, start, q, name, verdict)
                        else:
                            append(name)
                        p = q
                        continue
                # The first bytes of each line are looked up in the framing tables: a
                # hit is a valid line, a miss goes to the strict functions (framing.py).
                head = counts.get(data[p : p + SHORT_LINE])
                if head is not None:  # "*<argc>\r\n", 0 < argc < 100
                    argc, q = head
                    q += p
                elif data[p] != 42:  # not '*': an inline command
                    p, fwd = self._inline(data, p, n, fwd)
                    if p == start or self.held is not None:
                        break
                    continue
                else:
                    header = count_line(data, p, n)
                    if header is None:
                        break
                    argc, q = header
                    if argc > max_multibulk:
                        raise ProtocolError("invalid multibulk length")
                    if argc <= 0:  # the server ignores empty commands without a reply
                        p = q
                        continue
                head = names_at.get(data[q : q + SHORT_LINE])
                if head is not None:  # "$<size>\r\n", size < 100
                    e = q + head[0]
                    q += head[1]
                else:
                    if q >= n:
                        break
                    header = bulk_line(data, q, n, max_bulk)
                    if header is None:
                        break
                    size, e = header
                    if size > self._limits.max_inspect:
                        raise ProtocolError("command name too long")
                    q = e + size
                if q + 2 > n:
                    break
                # The name with its CR LF: a name seen before, properly ended.
                framed = framed_names.get(data[e : q + 2])
                if framed is not None:
                    name = framed
                else:
                    if data[q] != 13 or data[q + 1] != 10:
                        raise ProtocolError("invalid CRLF in request")
                    name = self._canonical(data[e:q])
                    if len(framed_names) < _NAME_CACHE_MAX:
                        framed_names[data[e : q + 2]] = name
                q += 2
                spec = special.get(name, default_spec)
                if spec is None:
                    # The common case: skip the arguments by their lengths, decide on the
                    # name and count. A value not all here is left to _skip.
                    left = argc - 1
                    while left:
                        end = bulk_end.get(data[q : q + SHORT_LINE])
                        if end is not None:
                            end += q
                        elif q < n and (header := bulk_line(data, q, n, max_bulk)):
                            end = header[1] + header[0]  # a longer value: the strict reader
                        else:
                            break
                        if data[end : end + 2] != b"\r\n":
                            break  # not all here, or malformed: _skip decides
                        q = end + 2
                        left -= 1
                    streaming = False
                    if left:
                        self._args_left = left
                        q = self._skip(data, q, n)
                        streaming = bool(self._args_left or self._bulk_left)
                    seen += 1
                    verdict = on_command(name, argc, None)
                    if verdict is None:
                        append(name)
                        p = q
                        if streaming:
                            break
                        continue
                elif spec == _INSPECT or spec in _NEEDS_ARGS:
                    args = self._collect(data, q, n, argc - 1, data[e : q - 2], bulks)
                    if spec == _INSPECT and args is not None:
                        # Every command of an audited session: the hooks see its arguments.
                        q, argv = args
                        seen += 1
                        verdict = on_command(name, argc, argv)
                        if verdict is None:
                            append(name)
                            p = q
                            continue
                    elif args is not None:
                        q, argv = args
                        out = self._decide_with_args(name, spec, argc, argv)
                        p = q
                        if out is not None:  # refused or replaced
                            if fwd < start:
                                self._forward(data[fwd:start])
                            if out:
                                self._forward(out)
                            fwd = q
                        continue
                    else:  # incomplete
                        if n - start <= self._limits.max_inspect:
                            break
                        if spec != _INSPECT:
                            raise ProtocolError(f"{name} command longer than the proxy accepts")
                        self._args_left = argc - 1
                        q = self._skip(data, q, n)
                        seen += 1
                        verdict = on_command(name, argc, None)
                        if verdict is None:
                            append(name)
                else:
                    self._args_left = argc - 1
                    if self._args_left:
                        q = self._skip(data, q, n)
                    seen += 1
                    verdict = on_command(name, argc, None)
                    if verdict is None:
                        verdict = self._special(name, spec, argc)
                        if self.held is not None:  # RESET: stop right after it
                            p = q
                            break
                if verdict is not None:
                    fwd = self._refused(data, fwd, start, q, name, verdict)
                    if self._args_left or self._bulk_left:
                        self._dropping = True
                p = q
                if self._args_left or self._bulk_left:
                    break
        except ProtocolError:
            # What was allowed before the bad command still goes to the server, so its
            # replies come back ahead of the error.
            if fwd < p and not self._dropping:
                self._forward(data[fwd:p])
            raise
        finally:
            self.commands += seen
        if p == n and not fwd and n:
            self._forward(data)  # the whole read goes on: the common case
        else:
            self._finish(data, fwd, p, n)

    def _refused(self, data: bytes, fwd: int, start: int, q: int, name: str, verdict: bytes) -> int:
        """The command at ``data[start:q]`` is answered with ``verdict`` instead of
        forwarded: what was allowed before it goes on first. Returns the new ``fwd``."""
        self.refused += 1
        if fwd < start:
            self._forward(data[fwd:start])
        self._local(Local(self._refusal(name, verdict)))
        return q

    def _finish(self, data: bytes, fwd: int, p: int, n: int) -> None:
        """Send ``data[fwd:p]`` on, keep ``data[p:]`` for the next read."""
        if fwd < p:
            if fwd == 0 and p == n:
                self._forward(data)
            else:
                self._forward(memoryview(data)[fwd:p])
        if p < n:
            self._rest = data[p:]

    def _skip(self, data: bytes, p: int, n: int) -> int:
        """Skip streamed arguments from ``p``; return where it stopped (``n`` inside a
        payload, or the start of an incomplete argument header)."""
        left = self._bulk_left  # payload and its CRLF; never 1 (see below)
        args_left = self._args_left
        try:
            while True:
                if left:
                    if n - p < left:
                        if n - p > left - 2:
                            # The payload is here and part of its CRLF: keep that byte
                            # for the next read, where the CRLF is checked whole.
                            p += left - 2
                            left = 2
                        else:
                            left -= n - p
                            p = n
                        break
                    p += left
                    if data[p - 2] != 13 or data[p - 1] != 10:
                        raise ProtocolError("invalid CRLF in request")
                    left = 0
                if not args_left or p >= n:
                    break
                header = bulk_line(data, p, n, self._max_bulk)
                if header is None:
                    break
                size, p = header
                args_left -= 1
                left = size + 2
        finally:  # kept in locals while skipping; where it stands now
            self._bulk_left = left
            self._args_left = args_left
        return p

    def _collect(
        self,
        data: bytes,
        p: int,
        n: int,
        count: int,
        raw_name: bytes,
        bulks: dict[bytes, tuple[int, int]],
    ) -> tuple[int, list[bytes]] | None:
        """All arguments when the whole command is in ``data``, else None. ``bulks``:
        the short ``$`` lines of this parser's limits (:func:`~.framing.short_bulks`)."""
        args = [raw_name]
        while count:
            head = bulks.get(data[p : p + SHORT_LINE])
            if head is not None:  # a valid "$<size>\r\n", size < 100
                start, end = head
                start += p
                end += p
            else:
                if p >= n:
                    return None
                header = bulk_line(data, p, n, self._max_bulk)
                if header is None:
                    return None
                size, start = header
                end = start + size
            if data[end : end + 2] != b"\r\n":
                if end + 2 > n:
                    return None
                raise ProtocolError("invalid CRLF in request")
            args.append(data[start:end])
            p = end + 2
            count -= 1
        return p, args

    def _canonical(self, raw: bytes) -> str:
        name = raw.upper().decode("latin-1")  # ASCII case only, as the server
        if len(self._names) < _NAME_CACHE_MAX:
            self._names[raw] = name
        return name

    # -- inline commands -----------------------------------------------------------------

    def _inline(self, data: bytes, p: int, n: int, fwd: int) -> tuple[int, int]:
        """Handle one inline line at ``p``; returns (new p, new fwd); p unchanged when
        the line is incomplete."""
        e = inline_end(data, p, n, self._limits.max_inline)
        if e < 0:
            return p, fwd
        line = data[p:e]
        args = split_args(line)
        if fwd < p:
            self._forward(data[fwd:p])
        if not args:  # an empty line: the server skips it without a reply
            return e + 1, e + 1
        name = self._canonical(args[0]) if args[0] not in self._names else self._names[args[0]]
        spec = _SPECIAL.get(name)
        out = self._decide_with_args(name, spec, len(args), args)
        if out is None:
            out = encode_command(args)
        if out:
            self._forward(out)
        return e + 1, e + 1

    # -- commands the engine looks at ----------------------------------------------------

    def _decide_with_args(
        self, name: str, spec: int | None, argc: int, args: Sequence[bytes]
    ) -> bytes | None:
        """For a command whose arguments are known: None to forward it as sent, bytes to
        forward instead, ``b""`` when answered locally."""
        self.commands += 1
        verdict = self._on_command(name, argc, args)
        if verdict is not None:
            self.refused += 1
            self._local(Local(self._refusal(name, verdict)))
            return b""
        if spec == _AUTH:
            return self._auth(args)
        if spec == _HELLO:
            return self._hello(args)
        if (
            spec == _CLIENT
            and argc == 3  # any other count: the server's arity error
            and server_word(args[1]) == b"REPLY"
            and server_word(args[2]) in _REPLY_OFF
        ):
            self.refused += 1
            reply = error_reply(f"ERR CLIENT REPLY {server_word(args[2]).decode()} {_REPLY_WHY}")
            self._local(Local(self._refusal(name, reply)))
            return b""
        if spec is not None and spec not in _NEEDS_ARGS and spec != _INSPECT:
            # Only inline commands get here with a spec of their own, after everything
            # before them was forwarded: a DISCARD written for EXEC is in its place.
            refusal = self._special(name, spec, argc)
            if refusal is not None:
                self.refused += 1
                self._local(Local(self._refusal(name, refusal)))
                return b""
            return None
        self._pending.append(name)
        return None

    def _refusal(self, name: str, reply: bytes) -> bytes:
        """The engine answers ``name`` with ``reply`` instead of forwarding it (what came
        before it is forwarded already): inside ``MULTI`` an error marks the transaction
        failed; a refused ``EXEC`` is answered and ends its transaction as the server
        does; an ``EXEC`` of a failed transaction sends ``DISCARD`` in its place."""
        if self._discard_owed:  # from _special: EXEC of a failed transaction
            self._discard_owed = False
            self._discard()
            return reply
        if reply[:1] != b"-":
            return reply
        if name == "EXEC":
            if self._in_multi:
                self._in_multi = self._multi_failed = False
                self._discard()
            return _EXECABORT_BECAUSE + reply[1:]
        if self._in_multi:
            self._multi_failed = True
        return reply

    def _discard(self) -> None:
        """End the server's transaction without running it; the client never sees the
        ``+OK``."""
        self._pending.append(Injected(_ignore_reply))
        self._forward(_DISCARD)

    def _special(self, name: str, spec: int, argc: int) -> bytes | None:
        """Record what a pub/sub, transaction or mode command is owed; a reply instead
        when the engine cannot follow it."""
        if spec in (_SUB, _UNSUB):
            if self._in_multi:
                return error_reply(f"{name} inside MULTI is not supported through the proxy")
            if argc > 1:
                self._pending.append(Sub(name, argc - 1))
            elif spec == _UNSUB:
                self._pending.append(Sub(name, -1))
            else:  # the server answers with one error
                self._pending.append(name)
            return None
        if spec == _MULTI:
            if argc == 1 and not self._in_multi:  # nested: the server flags it itself
                self._in_multi, self._multi_failed = True, False
        elif spec == _ENDMULTI:
            # EXEC ends the transaction whatever its arguments (one it rejects is
            # discarded); DISCARD with arguments is an arity error inside it.
            if name == "EXEC" or argc == 1:
                failed = self._in_multi and self._multi_failed and name == "EXEC"
                self._in_multi = self._multi_failed = False
                if failed and argc == 1:  # with arguments the server aborts it itself
                    self._discard_owed = True
                    return EXECABORT
        elif spec == _RESET and argc == 1:  # with arguments it is an arity error
            self._in_multi = self._multi_failed = False
            self._pending.append(Special(name))
            self.held = self._hooks.on_reset()
            return None
        elif spec == _MONITOR:
            self._pending.append(Special(name))
            return None
        self._pending.append(name)
        return None

    def _auth(self, args: Sequence[bytes]) -> bytes | None:
        if len(args) == 2:
            action = self._hooks.on_auth(None, args[1])
        elif len(args) == 3:
            action = self._hooks.on_auth(args[1], args[2])
        else:  # the server answers with a syntax error
            self._pending.append("AUTH")
            return None
        return self._apply(action, "AUTH", None)

    def _hello(self, args: Sequence[bytes]) -> bytes | None:
        hello = parse_hello(args)
        if hello is None:  # malformed: the server says why
            self._pending.append(Special("HELLO"))
            return None
        action = self._hooks.on_hello(hello)
        protover = hello.protover
        if action.replacement is not None:
            replaced = parse_hello(action.replacement)
            protover = replaced.protover if replaced is not None else None
        return self._apply(action, "HELLO", protover)

    def _apply(self, action: Action, name: str, protover: int | None) -> bytes | None:
        if action.reply is not None:
            if self._in_multi and action.reply[:1] == b"-":  # refused: never queued
                self._multi_failed = True
            self._local(Local(action.reply))
            return b""
        self._pending.append(Special(name, protover) if name == "HELLO" else name)
        if action.replacement is not None:
            return encode_command(action.replacement)
        return None


_REPLY_OFF = frozenset({b"OFF", b"SKIP"})
"""The ``CLIENT REPLY`` modes refused: the server would then leave commands without a
reply, so replies could no longer be matched to commands. ``ON`` (a no-op here) and the
forms the server refuses (another mode, another argument count) are forwarded, so the
client gets the server's own answer."""
_REPLY_WHY = "is not supported through the proxy: every command must get its reply"


def _ignore_reply(ok: bool) -> None:
    """The reply to the engine's own DISCARD."""


def parse_hello(args: Sequence[bytes]) -> Hello | None:
    """``HELLO [protover [AUTH username password] [SETNAME clientname]]`` read exactly as
    the server reads it (the version as ``string2ll`` does, options compared as C strings
    without case: ``"AUTH\\x00x"`` is ``AUTH``; a later AUTH or SETNAME wins); None when
    the server refuses it as malformed (its own error then reaches the client)."""
    protover = username = password = setname = None
    if len(args) > 1:
        protover = parse_long(args[1])
        if protover is None:
            return None
        i = 2
        while i < len(args):
            option = server_word(args[i])
            more = len(args) - 1 - i
            if option == b"AUTH" and more >= 2:
                username, password = args[i + 1], args[i + 2]
                i += 3
            elif option == b"SETNAME" and more >= 1:
                setname = args[i + 1]
                i += 2
            else:
                return None
    return Hello(protover, username, password, setname, tuple(args))
