"""Host and port as people write them in configs and on command lines (``h:6379``,
``[::1]:6379``): one reading, shared by every process. Pure."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator

_HOST = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")


def split_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``"h:6379"``, ``"[::1]:6379"`` (or ``"h"`` with a default port) -> (host, port);
    ValueError with an example otherwise."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port (example: [::1]:6379)")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write IPv6 addresses in brackets, like [::1]:6379")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (example: 10.0.1.5:6379)")
        return check_host(host, text), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return check_host(host, text), int(port_text)


def check_host(host: str, text: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOST.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normal_addr(text: str) -> str:
    """``host:port`` checked and written one way (``[::1]:6379`` for IPv6); ValueError
    with an example otherwise."""
    return join_host_port(*split_host_port(text))


HostPort = Annotated[str, AfterValidator(normal_addr)]
"""A config field holding ``host:port`` (a listen or diagnostics address)."""
