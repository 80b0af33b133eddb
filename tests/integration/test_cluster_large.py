"""Large values in the cluster engine: a command with a large argument is collected as it
arrives and handed on in pieces (never joined or copied whole on the event loop), a link
writes a large backlog a slice per turn of the event loop, and a session stops reading
its client while a node does not take what it was sent (back-pressure)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dbservice.engine.cluster import resp
from dbservice.engine.cluster.link import SLICE, Link
from dbservice.engine.cluster.topology import Address
from dbservice.engine.proxy.errors import ProtocolError
from dbservice.engine.proxy.session import Streams
from dbservice.engine.proxy.settings import ProxyLimits
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.cluster import ClusterProxy

pytestmark = pytest.mark.timeout(180)

LIMITS = ProxyLimits()


def joined(payload: resp.Payload) -> bytes:
    return payload if isinstance(payload, bytes) else b"".join(payload)


def read_all(
    data: bytes, cuts: list[int], limits: ProxyLimits = LIMITS, native: bool = True
) -> list[tuple[list[bytes], resp.Payload]]:
    reader = resp.CommandReader(limits, native=native)
    got: list[tuple[list[bytes], resp.Payload]] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        got += reader.feed(data[start:end])
        assert reader.error is None
    assert reader.held == 0
    return got


# -- the command reader ------------------------------------------------------------------


def test_a_large_argument_is_handed_on_whole_and_its_command_in_pieces() -> None:
    value = os.urandom(3 << 20)
    data = (
        b"PING\r\n"
        + resp.encode_command([b"SET", b"k", value])
        + resp.encode_command([b"GET", b"k"])
    )
    reader = resp.CommandReader(LIMITS)
    got: list[tuple[list[bytes], resp.Payload]] = []
    held = []
    for i in range(0, len(data), 256 * 1024):
        got += reader.feed(data[i : i + 256 * 1024])
        held.append((reader.held, reader.declared))
    assert [args for args, _ in got] == [[b"PING"], [b"SET", b"k", value], [b"GET", b"k"]]
    raw = got[1][1]
    assert isinstance(raw, tuple)  # in pieces around the value, which is the argument itself
    assert any(piece is got[1][0][2] for piece in raw)
    assert joined(raw) == resp.encode_command([b"SET", b"k", value])
    # what the session accounts against its limits: held as it arrives, declared whole
    assert held[1] == (512 * 1024 - 6, len(resp.encode_command([b"SET", b"k", value])))
    assert held[-1] == (0, 0)


@pytest.mark.parametrize("seed", range(40))
def test_commands_with_large_arguments_cut_anywhere(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a small threshold, every path: large arguments first, last, several in one
    command, followed by small ones still arriving, by inline commands; the arguments
    and the bytes handed on are those sent, wherever the reads cut."""
    monkeypatch.setattr(resp, "LARGE_ARGUMENT", 8)
    rng = random.Random(seed)
    commands = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.2:
            commands.append(([b"PING"], b"PING\r\n"))
            continue
        args = [rng.randbytes(rng.choice([0, 1, 3, 7, 8, 9, 20, 50])) for _ in range(4)]
        args = [b"SET", *args[: rng.randint(1, 4)]]
        commands.append((args, resp.encode_command(args)))
    data = b"".join(raw for _, raw in commands)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    got = read_all(data, cuts)
    assert [args for args, _ in got] == [args for args, _ in commands]
    # an inline command goes on as the server reads it; any other as it was sent
    sent = [resp.encode_command(args) for args, _ in commands]
    assert [joined(raw) for _, raw in got] == sent


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("seed", range(40))
def test_commands_of_many_arguments_cut_anywhere(
    seed: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With small thresholds, a command still arriving keeps its arguments read so far
    apart (RESUME_AFTER), once or several times, also around large arguments and
    before an argument whose payload is not all here: the arguments and the bytes
    handed on are those sent, wherever the reads cut."""
    rng = random.Random(seed)
    resume_after = rng.choice([1, 8, 30])
    monkeypatch.setattr(resp, "RESUME_AFTER", resume_after)
    monkeypatch.setattr(resp, "LARGE_ARGUMENT", 40 if resume_after > 1 else 1 << 20)
    commands = []
    for _ in range(rng.randint(1, 4)):
        args = [rng.randbytes(rng.choice([0, 1, 3, 9, 20, 50])) for _ in range(rng.randint(1, 30))]
        args = [b"MSET", *args]
        commands.append(args)
    data = b"".join(resp.encode_command(args) for args in commands)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 40))))
    got = read_all(data, cuts, native=native)
    assert [args for args, _ in got] == commands
    assert [joined(raw) for _, raw in got] == [resp.encode_command(args) for args in commands]


def test_a_command_of_many_small_arguments_is_not_read_again_from_its_start() -> None:
    """A command of 150,000 small arguments sent 4 KiB at a time: each read is parsed
    from the first argument still missing, not from the command's start (which made the
    work grow with the square of the command's size: 80,000 arguments took 1.4 s of
    CPU, a 128 MiB command would take hours while every session of the agent waits)."""
    count = 150_000
    args = [b"MSET", *[b"k%d" % (i // 2) if i % 2 == 0 else b"v" for i in range(count)]]
    data = resp.encode_command(args)
    reader = resp.CommandReader(LIMITS)
    got: list[tuple[list[bytes], resp.Payload]] = []
    most = 0
    for i in range(0, len(data), 4096):
        got += reader.feed(data[i : i + 4096])
        most = max(most, reader._size)  # the bytes the next read parses again
    assert most <= resp.RESUME_AFTER + 2 * 4096, most
    assert len(got) == 1 and got[0][0] == args
    assert joined(got[0][1]) == data
    assert reader.held == 0


def test_an_error_in_a_late_argument_is_found_where_it_was_before() -> None:
    """The bytes before the bad line are kept apart, not re-read: the error is the
    one a whole read gives, and nothing of the command is handed on."""
    args = [b"MSET", *[b"x" * 10] * 20_000]
    data = resp.encode_command(args)[: -16 * 3] + b"$9x\r\n"  # at an argument's line
    whole = resp.CommandReader(LIMITS)
    with pytest.raises(ProtocolError) as at_once:
        whole.feed(data)
    reader = resp.CommandReader(LIMITS)
    with pytest.raises(ProtocolError) as in_pieces:
        for i in range(0, len(data), 1000):
            assert reader.feed(data[i : i + 1000]) == []
    assert in_pieces.value.reply == at_once.value.reply


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_a_large_argument_without_its_crlf_is_refused(cut: int) -> None:
    data = resp.encode_command([b"SET", b"k", b"v" * (2 << 20)])[:-2] + b"xx*1\r\n$4\r\nPING\r\n"
    end = len(data) - 18 + cut
    reader = resp.CommandReader(LIMITS)
    reader.feed(data[:end])
    with pytest.raises(ProtocolError, match="invalid CRLF in request"):
        reader.feed(data[end:])


def test_encode_payload_keeps_large_arguments_apart() -> None:
    big = b"x" * resp.LARGE_ARGUMENT
    args = [b"MSET", b"a", big, b"b", b"1", b"c", big]
    payload = resp.encode_payload(args)
    assert isinstance(payload, tuple) and sum(piece is big for piece in payload) == 2
    assert joined(payload) == resp.encode_command(args)
    assert resp.payload_size(payload) == len(resp.encode_command(args))
    assert joined(resp.prefixed(b"*1\r\n$6\r\nASKING\r\n", payload)).startswith(b"*1\r\n$6\r\nA")
    assert resp.encode_payload([b"GET", b"k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


# -- the link -------------------------------------------------------------------------


class Sink:
    """A plain TCP server that counts and hashes the bytes it gets, and reads only while
    ``reading`` is set."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.reading = asyncio.Event()
        self.reading.set()
        self.grew = asyncio.Event()
        self.ended = asyncio.Event()

    async def received(self, size: int) -> None:
        while self.size < size:
            self.grew.clear()
            await self.grew.wait()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await self.reading.wait()
            data = await reader.read(1 << 20)
            if not data:
                break
            self.digest.update(data)
            self.size += len(data)
            self.grew.set()
        writer.close()
        await writer.wait_closed()
        self.ended.set()


async def open_link(sink: Sink, limits: ProxyLimits = LIMITS) -> tuple[Link, asyncio.Server]:
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def dial(address: Address) -> Streams:
        return await asyncio.open_connection(*address)

    async def prepare(link: Link, streams: Streams) -> None:
        return None

    link = Link(("127.0.0.1", port), dial=dial, prepare=prepare, limits=limits)
    return link, server


async def test_a_link_writes_a_large_backlog_a_slice_per_turn() -> None:
    sink = Sink()
    link, server = await open_link(sink)
    async with server:
        value = os.urandom(32 << 20)
        payload = resp.encode_payload([b"SET", b"k", value])
        turns = 0
        done = False

        def tick() -> None:
            nonlocal turns
            turns += 1
            if not done:
                asyncio.get_running_loop().call_soon(tick)

        link.send(payload)
        tick()
        size = resp.payload_size(payload)
        async with asyncio.timeout(60):
            await sink.received(size)
        done = True
        # the old link wrote it in one go; now the loop turns at least once per slice
        assert turns >= size // SLICE
        assert sink.digest.digest() == hashlib.sha256(joined(payload)).digest()
        await link.aclose()
        await sink.ended.wait()


async def test_a_link_holds_back_while_the_node_does_not_read() -> None:
    sink = Sink()
    sink.reading.clear()
    link, server = await open_link(sink)
    async with server:
        payloads = [os.urandom(4 << 20) for _ in range(8)]
        for payload in payloads:
            link.write(payload)
        drained = asyncio.create_task(link.drained())
        await asyncio.sleep(1.0)
        # the kernel's buffers and the transport's take a few MB; the rest waits
        assert link.congested and not drained.done()
        sink.reading.set()
        async with asyncio.timeout(60):
            await drained
            await sink.received(32 << 20)
        assert sink.digest.digest() == hashlib.sha256(b"".join(payloads)).digest()
        await link.aclose()
        await sink.ended.wait()


# -- the session ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    # its own stand-in: the test stops a node (for longer than other tests' node timeout)
    config = StandinConfig(dir=tmp_path_factory.mktemp("cluster"), shards=1, node_timeout_ms=60_000)
    with ThreadedStandin(config) as running:
        yield running


def test_a_command_of_many_arguments_sent_slowly_runs_whole(standin: ThreadedStandin) -> None:
    """An MSET of 40,000 pairs (one hash slot, about 1 MB) sent 8 KiB at a time through
    the cluster engine, its arguments kept apart as they arrive: the node runs it once
    and whole, as it runs the same bytes sent to it directly."""
    pairs = [(b"{many}k%d" % i, b"v%d" % i) for i in range(40_000)]
    data = resp.encode_command([b"MSET", *[x for pair in pairs for x in pair]])
    with ClusterProxy(standin) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(data), 8192):
                client.sendall(data[i : i + 8192])
                if i % (16 * 8192) == 0:
                    time.sleep(0.002)  # let the engine read the command in many reads
            client.sendall(resp.encode_command([b"MGET", pairs[0][0], pairs[-1][0]]))
            replies = b""
            want = b"+OK\r\n*2\r\n$2\r\nv0\r\n$6\r\nv39999\r\n"
            while len(replies) < len(want):
                chunk = client.recv(1 << 16)
                assert chunk, replies
                replies += chunk
        assert replies == want
        with proxy.client() as check:
            assert check.dbsize() >= 40_000


def test_a_session_stops_reading_while_its_node_does_not_take_what_it_sent(
    standin: ThreadedStandin,
) -> None:
    """A pipeline of large SETs to a node that has stopped reading: the engine reads no
    more of the client than the sockets and one link's high-water mark hold (it used to
    read all of it into the link's write buffer), and all of it arrives once the node
    reads again."""
    value = os.urandom(4 << 20)
    count = 48
    commands = [resp.encode_command([b"SET", b"big%d" % i, value]) for i in range(count)]
    node = standin.standin.nodes[0]
    assert node.proc is not None
    with ClusterProxy(standin) as proxy:
        with proxy.client() as warm:
            assert warm.set("warm", "1")
        sent = [0]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as client:
            client.sendall(resp.encode_command([b"SET", b"big", b"1"]))  # its link is open
            assert client.recv(64) == b"+OK\r\n"

            def send() -> None:
                with contextlib.suppress(OSError):
                    for command in commands:
                        view = memoryview(command)
                        while view:
                            n = client.send(view[: 1 << 20])
                            sent[0] += n
                            view = view[n:]

            os.kill(node.proc.pid, signal.SIGSTOP)
            try:
                sender = threading.Thread(target=send)
                sender.start()
                time.sleep(3.0)
                taken = sent[0]
            finally:
                os.kill(node.proc.pid, signal.SIGCONT)
            sender.join(60)
            replies = b""
            while len(replies) < 5 * count:
                replies += client.recv(1 << 16)
        assert replies == b"+OK\r\n" * count
        total = sum(map(len, commands))
        assert taken < total // 2, (taken, total)
        with proxy.client() as check:
            assert check.get(b"big%d" % (count - 1)) == value
