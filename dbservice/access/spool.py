"""The audit spool: events the bus could not take, kept on the agent's disk, in order.

:class:`AuditSpool` is a FIFO of encoded audit messages in ``<data_dir>/audit-spool``
(the directory 0700, its files 0600). It holds what :class:`~dbservice.access.audit.AuditEmitter`
could not publish: while NATS (or the JetStream behind it) does not answer, every new
event is appended here, behind the ones already waiting, and the emitter publishes from
the head once the link is back, oldest first, removing what JetStream acknowledged. It is
read again when the agent starts, so a restart loses nothing that reached it.

On disk: segment files ``seg-<number>`` of lines ``<subject> <id> <events> <json>\\n``
(the JSON of an event never holds a newline), and ``acked``, the position (segment and
offset) of the first line not yet acknowledged, replaced atomically after each
acknowledged window. A line is one ``write()`` of an ``O_APPEND`` descriptor, so a killed
agent leaves whole lines behind (a line cut by a crash of the machine is dropped at the
next start); :meth:`AuditSpool.sync` (``fsync``) runs about once a second while the
spool grows. A line published whose acknowledgement had not been recorded before a
crash is published again at the next start: its ``Nats-Msg-Id`` lets JetStream store it
once within the stream's duplicate window.

The spool is bounded by ``max_bytes`` (lines not yet acknowledged): :meth:`full` tells
the listener to refuse new sessions and commands rather than lose their events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from bus.audit import Spooled

logger = logging.getLogger(__name__)

SEGMENT_BYTES: Final = 64 * 1024 * 1024
"""A segment file is closed at this size and a new one started; a segment is deleted
once every line of it was acknowledged."""
FIRST_SEGMENT: Final = 1 << 40
"""The number of the first segment: :meth:`AuditSpool.prepend` numbers down from there."""
ACKED_FILE: Final = "acked"
_SEGMENT: Final = re.compile(r"^seg-(\d{16})$")


class SpoolError(Exception):
    """The spool directory cannot be used; the message says what to fix."""


def _segment_name(number: int) -> str:
    return f"seg-{number:016d}"


def encode_line(item: Spooled) -> bytes:
    if b"\n" in item.data:
        raise ValueError("an audit message holds a newline")
    return b"%s %s %d %s\n" % (item.subject.encode(), item.id.encode(), item.events, item.data)


def decode_line(line: bytes) -> Spooled | None:
    """A line back as :class:`Spooled`; None when it is not one (logged by the caller)."""
    parts = line.rstrip(b"\n").split(b" ", 3)
    if len(parts) != 4:
        return None
    try:
        return Spooled(parts[0].decode(), parts[1].decode(), int(parts[2]), parts[3])
    except (UnicodeDecodeError, ValueError):
        return None


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    """Bytes of whole lines in the file."""
    lines: int
    events: int


class AuditSpool:
    """Open with :meth:`open`; one process at a time (the agent's data_dir lock)."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._head = (FIRST_SEGMENT, 0)
        """Segment and offset of the first line not yet acknowledged."""
        self._tail_fd: int | None = None
        self._pending_bytes = 0
        self._pending_events = 0
        self._pending_lines = 0
        self._peeked: list[tuple[int, int, int, int]] = []
        """For each record :meth:`peek` returned: segment, end offset, events, bytes."""
        self.dirty = False
        """Lines written since the last :meth:`sync`."""
        self.written_total = 0
        """Lines appended since start."""
        self.acked_total = 0
        """Lines acknowledged since start."""

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES
    ) -> AuditSpool:
        """Create ``directory`` (0700) or read what a previous run left in it."""
        spool = cls(directory, max_bytes=max_bytes, segment_bytes=segment_bytes)
        spool.load()
        return spool

    def load(self) -> None:
        """Create the directory, or read what a previous run left in it (at the start)."""
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
            self._load()
        except OSError as exc:
            raise SpoolError(
                f"the audit spool {directory}: cannot use it ({exc.strerror or exc}); the "
                "agent keeps audit events there while NATS cannot take them"
            ) from None
        if self._pending_lines:
            logger.info(
                "audit spool %s: %d events (%d messages, %d bytes) from before the start "
                "wait for NATS",
                directory,
                self._pending_events,
                self._pending_lines,
                self._pending_bytes,
            )

    def _load(self) -> None:
        numbers = sorted(
            int(m.group(1))
            for name in os.listdir(self.directory)
            if (m := _SEGMENT.match(name)) is not None
        )
        head = self._read_acked()
        for number in numbers:
            path = self.directory / _segment_name(number)
            if head is not None and number < head[0]:
                path.unlink()  # acknowledged to the end before the last stop
                continue
            data = path.read_bytes()
            whole = data.rfind(b"\n") + 1
            if whole < len(data):
                logger.warning(
                    "audit spool %s: dropping %d bytes of a line cut short by a crash",
                    path,
                    len(data) - whole,
                )
                os.truncate(path, whole)
            start = head[1] if head is not None and number == head[0] else 0
            lines = events = 0
            for line in data[start:whole].splitlines():
                record = decode_line(line)
                lines += 1
                events += record.events if record is not None else 1
            self._segments.append(_Segment(number, whole, lines, events))
            self._pending_bytes += whole - start
            self._pending_lines += lines
            self._pending_events += events
        if self._segments:
            first = self._segments[0].number
            self._head = (first, head[1] if head is not None and head[0] == first else 0)

    def _read_acked(self) -> tuple[int, int] | None:
        try:
            found = orjson.loads((self.directory / ACKED_FILE).read_bytes())
            return int(found["segment"]), int(found["offset"])
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning(
                "audit spool %s: %s is unreadable; publishing every line again (JetStream "
                "drops those it already has, within its duplicate window)",
                self.directory,
                ACKED_FILE,
            )
            return None

    # -- state --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages waiting."""
        return self._pending_lines

    @property
    def pending_events(self) -> int:
        """Events waiting (a batch counts its commands)."""
        return self._pending_events

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def full(self) -> bool:
        """Whether the spool holds ``max_bytes`` or more: new sessions and commands are
        refused until the bus has taken some."""
        return self._pending_bytes >= self.max_bytes

    # -- writing ------------------------------------------------------------------------

    def append(self, items: Iterable[Spooled]) -> None:
        """Add ``items`` behind everything waiting (not checked against ``max_bytes``:
        the caller refuses new work when :meth:`full`)."""
        for item in items:
            line = encode_line(item)
            segment = self._segments[-1] if self._segments else None
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._new_tail(segment.number + 1 if segment else FIRST_SEGMENT)
            if self._tail_fd is None:  # the last segment a previous run left
                self._tail_fd = self._open_append(segment.number)
            os.write(self._tail_fd, line)
            segment.size += len(line)
            self._count(segment, item, len(line))

    def prepend(self, items: Sequence[Spooled]) -> None:
        """Put ``items`` before everything waiting (messages that were already being
        published when the spool took over, so older than anything in it). The head
        segment is rewritten as a new one: ``items``, then its lines not yet
        acknowledged (the position in it is kept that way, also across a restart)."""
        if not items:
            return
        if not self._pending_lines:
            self.append(items)
            return
        offset = self._head[1]
        head = self._segments[0]
        path = self.directory / _segment_name(head.number)
        with open(path, "rb") as file:
            file.seek(offset)
            rest = file.read(head.size - offset)
        data = b"".join(encode_line(item) for item in items)
        new = _Segment(head.number - 1, len(data) + len(rest), head.lines, head.events)
        for item in items:
            self._count(new, item, len(encode_line(item)))
        fd = os.open(
            self.directory / _segment_name(new.number), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        try:
            os.write(fd, data + rest)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._head = (new.number, 0)
        self._peeked.clear()
        self._write_acked()
        if len(self._segments) == 1:
            self._close_tail()  # appends go on in the new segment
        self._segments[0] = new
        path.unlink()

    def _count(self, segment: _Segment, item: Spooled, size: int) -> None:
        segment.lines += 1
        segment.events += item.events
        self._pending_lines += 1
        self._pending_events += item.events
        self._pending_bytes += size
        self.written_total += 1
        self.dirty = True

    def _new_tail(self, number: int) -> _Segment:
        self._close_tail()
        self._tail_fd = self._open_append(number)
        segment = _Segment(number, 0, 0, 0)
        if not self._segments:
            self._head = (number, 0)
        self._segments.append(segment)
        return segment

    def _open_append(self, number: int) -> int:
        path = self.directory / _segment_name(number)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _close_tail(self) -> None:
        if self._tail_fd is not None:
            fd, self._tail_fd = self._tail_fd, None
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)

    def sync(self) -> None:
        """``fsync`` the segment being written (what a crash of the machine may lose)."""
        self.dirty = False
        if self._tail_fd is not None:
            os.fsync(self._tail_fd)

    # -- reading ------------------------------------------------------------------------

    def peek(self, count: int, max_bytes: int = 4 * 1024 * 1024) -> list[Spooled]:
        """Up to ``count`` messages from the head (at least one, at most about
        ``max_bytes``), oldest first, without removing them (:meth:`ack` does)."""
        self._peeked.clear()
        out: list[Spooled] = []
        taken = 0
        number, offset = self._head
        for segment in self._segments:
            if segment.number < number:
                continue
            start = offset if segment.number == number else 0
            if start >= segment.size:
                continue
            with open(self.directory / _segment_name(segment.number), "rb") as file:
                file.seek(start)
                position = start
                while position < segment.size and len(out) < count:
                    line = file.readline()
                    if not line.endswith(b"\n"):
                        break
                    position += len(line)
                    record = decode_line(line)
                    if record is None:  # not ours: skip it, but count it as done
                        logger.error(
                            "audit spool %s: skipping an unreadable line at %d",
                            _segment_name(segment.number),
                            position - len(line),
                        )
                        record = Spooled("", "", 1, b"")
                    out.append(record)
                    self._peeked.append((segment.number, position, record.events, len(line)))
                    taken += len(line)
                    if taken >= max_bytes:
                        return out
            if len(out) >= count:
                break
        return out

    def ack(self, count: int) -> None:
        """The first ``count`` messages of the last :meth:`peek` are stored: remove them."""
        if count <= 0:
            return
        done, self._peeked = self._peeked[:count], self._peeked[count:]
        for number, end, events, size in done:
            self._pending_lines -= 1
            self._pending_events -= events
            self._pending_bytes -= size
            self.acked_total += 1
            self._head = (number, end)
        while self._segments:
            first = self._segments[0]
            number, offset = self._head
            if first.number > number or (first.number == number and offset < first.size):
                break
            self._segments.pop(0)
            if not self._segments:
                self._close_tail()  # the tail, acknowledged to its end
                self._head = (FIRST_SEGMENT, 0)
            elif number <= first.number:  # the head was at its end: the next one's start
                self._head = (self._segments[0].number, 0)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _segment_name(first.number)).unlink()
        self._write_acked()

    def _write_acked(self) -> None:
        number, offset = self._head
        tmp = self.directory / (ACKED_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps({"segment": number, "offset": offset}))
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / ACKED_FILE)

    def close(self) -> None:
        self._close_tail()
