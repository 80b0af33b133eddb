"""The route preamble: encoding, the agent's parser on good and bad input, and the
client's side against a real TLS socket."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
from dbservice.route import (
    ROUTE_OK,
    USE_CONNECT,
    LoginRoute,
    Route,
    RouteError,
    RouteRefused,
    encode_refusal,
    encode_route,
    open_route,
    read_opening,
    read_route,
)
from fleetgate.resp import encode_command


def reader_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def parse(data: bytes, **kwargs: int) -> Route:
    return await asyncio.wait_for(read_route(reader_of(data), **kwargs), 5)


def test_encode_route_is_a_resp_array() -> None:
    assert encode_route("orders", "app") == (
        b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$6\r\norders\r\n$3\r\napp\r\n"
    )
    with pytest.raises(ValueError, match="database name and a db user"):
        encode_route("", "app")


async def test_round_trip_and_unicode() -> None:
    assert await parse(encode_route("orders-dev", "app")) == Route("orders-dev", "app")
    assert await parse(encode_route("bücher", "é")) == Route("bücher", "é")
    assert await parse(encode_route("carts", "app", "shard-1")) == Route("carts", "app", "shard-1")
    assert await parse(encode_route("carts", "app", port=6400)) == Route("carts", "app", "", 6400)
    both = encode_route("carts", "app", "shard-1", 6400)
    assert both.startswith(b"*7\r\n") and b"$4\r\nNODE\r\n" in both
    assert await parse(both) == Route("carts", "app", "shard-1", 6400)


async def test_command_name_is_case_insensitive_and_rest_stays_unread() -> None:
    reader = reader_of(
        b"*3\r\n$15\r\nfleetgate.route\r\n$1\r\nd\r\n$1\r\nu\r\n*1\r\n$4\r\nPING\r\n"
    )
    assert await read_route(reader) == Route("d", "u")
    assert await reader.read() == b"*1\r\n$4\r\nPING\r\n"  # the stream after it


@pytest.mark.parametrize(
    "data",
    [
        b"PING\r\n",  # inline command
        b"*1\r\n$4\r\nPING\r\n",  # a RESP command instead of the route
        b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n",
        b"*3\r\n$15\r\nFLEETGATE.ROUTX\r\n$1\r\nd\r\n$1\r\nu\r\n",
        b"*1\r\n$999999999\r\n",  # a huge first element is refused before it is read
        b"\x16\x03\x01\x00",  # TLS inside TLS, or any binary
    ],
)
async def test_clients_without_the_preamble_are_told_to_use_db_connect(data: bytes) -> None:
    with pytest.raises(RouteError) as info:
        await parse(data)
    assert str(info.value) == USE_CONNECT
    assert "fleetgate db connect" in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*2\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\nd\r\n", "takes a database name and a db user"),
        (b"*6\r\n$15\r\nFLEETGATE.ROUTE\r\n", "takes a database name and a db user"),
        (
            b"*5\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\nd\r\n$1\r\nu\r\n$4\r\nHOST\r\n$1\r\nx\r\n",
            "unknown or repeated option b'HOST'",
        ),
        (
            b"*5\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\nd\r\n$1\r\nu\r\n$4\r\nPORT\r\n$2\r\n-1\r\n",
            "bad port",
        ),
        (
            b"*5\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\nd\r\n$1\r\nu\r\n$4\r\nPORT\r\n$5\r\n70000\r\n",
            "port 70000 is not a TCP port",
        ),
        (b"*x\r\n", "bad array length"),
        (b"*-1\r\n", "bad array length"),
        (b"*33333333333333333\r\n", "array header is too long"),
        (b"*3\n$15\r\n", "bad array length"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n:1\r\n", "database name must be a bulk string"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$0\r\n\r\n$1\r\nu\r\n", "non-empty"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$2\r\na\n\r\n$1\r\nu\r\n", "printable"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\na\r\n$2\r\n u\r\n", "printable"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\nab\r\n", "not followed by CRLF"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$2\r\n\xff\xfe\r\n$1\r\nu\r\n", "not UTF-8"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\rxd", "bare CR"),
        (b"*3\r\n$15\r\nFLEETGATE.ROUTE\r\n$1\r\n", "closed before"),
        (b"", "closed before"),
    ],
)
async def test_malformed_preambles(data: bytes, message: str) -> None:
    with pytest.raises(RouteError, match=message):
        await parse(data)


async def test_sizes_are_bounded() -> None:
    assert await parse(encode_route("a" * 64, "u"), limit=64) == Route("a" * 64, "u")
    with pytest.raises(RouteError, match="longer than 64 bytes"):
        await parse(encode_route("a" * 65, "u"), limit=64)
    with pytest.raises(RouteError, match="db user is longer than 64 bytes"):
        await parse(encode_route("d", "u" * 65), limit=64)


def command(*args: str | bytes) -> bytes:
    return encode_command([a if isinstance(a, bytes) else a.encode() for a in args])


async def opening(data: bytes) -> Route | LoginRoute:
    return await asyncio.wait_for(read_opening(reader_of(data)), 5)


async def test_the_first_auth_or_hello_names_the_route_and_is_given_back() -> None:
    assert await opening(command("AUTH", "app@orders", "pw")) == LoginRoute(
        Route("orders", "app"), command("AUTH", "app", "pw")
    )
    # the database follows the last @; the password is passed on as sent
    assert await opening(command("auth", "a@b@orders", b"\x00\r\n")) == LoginRoute(
        Route("orders", "a@b"), command("AUTH", "a@b", b"\x00\r\n")
    )
    assert await opening(command("HELLO", "3", "auth", "app@orders", "pw")) == LoginRoute(
        Route("orders", "app"), command("HELLO", "3", "AUTH", "app", "pw")
    )
    both = command("hello", "2", "SetName", "me", "AUTH", "app@orders", "pw")
    assert await opening(both) == LoginRoute(
        Route("orders", "app"), command("HELLO", "2", "AUTH", "app", "pw", "SETNAME", "me")
    )
    assert await opening(encode_route("orders", "app")) == Route("orders", "app")
    reader = reader_of(command("AUTH", "app@orders", "pw") + command("PING"))
    assert isinstance(await read_opening(reader), LoginRoute)
    assert await reader.read() == command("PING")  # the stream after it, unread


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (command("PING"), USE_CONNECT),
        (b"AUTH app@orders pw\r\n", USE_CONNECT),
        (command("AUTH\x00", "app@orders", "pw"), USE_CONNECT),
        (command("AUTH", "pw"), "AUTH <password> alone names no db user or database"),
        (command("AUTH", "app@orders", "pw", "x"), "AUTH <password> alone"),
        (command("AUTH", "app", "pw"), "the first AUTH names no route"),
        (command("AUTH", "@orders", "pw"), "the first AUTH names no route"),
        (command("AUTH", "app@", "pw"), "the first AUTH names no route"),
        (command("AUTH", "app @orders", "pw"), "the first AUTH names no route"),
        (command("AUTH", "app@orders\n", "pw"), "printable"),
        (command("AUTH", "app@orders", "p" * 4097), "password is longer than 4096 bytes"),
        (command("AUTH", "a" * 513 + "@orders", "pw"), "at most 512 bytes"),
        (command("HELLO", "3"), "the first HELLO must name the route"),
        (command("HELLO", "3", "SETNAME", "x", "SETNAME", "y", "z"), "repeated"),
        (command("HELLO", "3", "SETNAME", "x", "AUTH"), "incomplete option b'AUTH'"),
        (command("HELLO", "4", "AUTH", "app@orders", "pw"), "protocol version b'4'"),
        (command("HELLO", "3", "AUTH\x00", "app@orders", "pw"), "option b'AUTH\\x00'"),
        (command("HELLO", "3", "AUTH", "app@orders", "pw", "AUTH", "x"), "repeated"),
        (b"*3\r\n$4\r\nAUTH\r\n$999999999\r\n", "user name is longer than 1025"),
        (b"*3\r\n$4\r\nAUTH\r\n$5\r\na@b", "closed before its first command"),
    ],
)
async def test_other_first_commands_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(RouteError) as info:
        await opening(data)
    assert message in str(info.value)


def test_refusal_is_one_line() -> None:
    assert encode_refusal("no\r\nway  here") == b"-ERR no way here\r\n"
    assert encode_refusal("x", code="NOPERM") == b"-NOPERM x\r\n"
    assert RouteRefused("why", code="NOPERM").resp() == b"-NOPERM why\r\n"


# -- open_route over real TLS ------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = CertificateAuthority.create()
    key = new_key()
    cert = ca.issue_server(key.public_key(), ["127.0.0.1"], 600)
    (tmp_path / "cert.pem").write_text(cert_pem(cert))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=ca.pem)
    return server, client


async def serve_answer(server_ctx: ssl.SSLContext, answer: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_route(reader)
            writer.write(answer)
            await writer.drain()
            if answer == ROUTE_OK:
                writer.write(await reader.readexactly(4))  # echo what follows
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    return server, server.sockets[0].getsockname()[1]


async def test_open_route_ok_then_plain_stream(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, port = await serve_answer(tls[0], ROUTE_OK)
    async with server:
        reader, writer = await asyncio.wait_for(
            open_route("127.0.0.1", port, ssl_context=tls[1], database="d", db_user="u"), 5
        )
        writer.write(b"PING")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PING"
        writer.close()


@pytest.mark.parametrize(
    ("answer", "code", "reason"),
    [
        (b"-ERR none of your roles allows d as db user 'u'\r\n", "ERR",
         "none of your roles allows d as db user 'u'"),
        (b"-NOPERM denied\r\n", "NOPERM", "denied"),
        (b"+WHAT\r\n", "ERR", "unexpected answer to the route: '+WHAT'"),
        (b"", "ERR", "the agent closed the connection without answering the route"),
    ],
)  # fmt: skip
async def test_open_route_refused(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], answer: bytes, code: str, reason: str
) -> None:
    server, port = await serve_answer(tls[0], answer)
    async with server:
        with pytest.raises(RouteRefused) as info:
            await asyncio.wait_for(
                open_route("127.0.0.1", port, ssl_context=tls[1], database="d", db_user="u"), 5
            )
    assert (info.value.code, info.value.reason) == (code, reason)


async def test_open_route_checks_the_agent_name(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server, port = await serve_answer(tls[0], ROUTE_OK)
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|match"):
            await asyncio.wait_for(
                open_route(
                    "127.0.0.1", port, ssl_context=tls[1], database="d", db_user="u",
                    server_hostname="agent-9.internal",
                ),
                5,
            )  # fmt: skip
