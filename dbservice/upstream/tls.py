"""TLS towards the database: which CAs are trusted, per mode, and what to say when the
server's certificate does not verify.

Modes (``bus.schemas.TLSMode``):

* ``verify-full`` (default): the chain must lead to a trusted root *and* the certificate
  must name the host (or ``tls.server_name``);
* ``verify-ca``: the chain only (for endpoints reached by an alias the certificate does
  not name);
* ``insecure``: TLS without any verification;
* ``disabled``: no TLS at all.

Trusted roots: the system store, Amazon's root CAs shipped inside the package
(``amazon-root-ca.pem``: Amazon Root CA 1-4 and Starfield Services Root G2, the roots of
MemoryDB's certificates, so a host with an old or minimal trust store still verifies
MemoryDB), the agent's ``upstream_ca_file`` and the database's own ``tls.ca_cert``.
"""

from __future__ import annotations

import ssl
from importlib import resources
from pathlib import Path
from typing import Final

AMAZON_ROOTS_NAME: Final = "amazon-root-ca.pem"
MODES: Final = ("verify-full", "verify-ca", "insecure", "disabled")


def amazon_roots_pem() -> str:
    """The PEM text of Amazon's root CAs shipped with fleetgate."""
    return resources.files(__package__).joinpath(AMAZON_ROOTS_NAME).read_text()


def upstream_context(
    mode: str, *, ca_pem: str | None = None, ca_file: Path | None = None
) -> ssl.SSLContext | None:
    """The client context for ``mode`` (None for ``disabled``); ValueError for an
    unknown mode, ssl.SSLError for a CA that does not parse."""
    if mode not in MODES:
        raise ValueError(f"unknown TLS mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "disabled":
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=amazon_roots_pem())
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    if mode in ("verify-ca", "insecure"):
        context.check_hostname = False
    if mode == "insecure":
        context.verify_mode = ssl.CERT_NONE
    return context


def trusted_sources(*, ca_pem: str | None = None, ca_file: Path | None = None) -> str:
    """The CAs a context of :func:`upstream_context` trusts, in words."""
    parts = ["the system roots", "Amazon's root CAs"]
    if ca_file is not None:
        parts.append(f"upstream_ca_file {ca_file}")
    if ca_pem:
        parts.append("the database's tls.ca_cert")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def verify_failure(
    exc: ssl.SSLError,
    *,
    database: str,
    mode: str,
    ca_pem: str | None = None,
    ca_file: Path | None = None,
) -> str:
    """One line for a failed handshake: why, which CAs were trusted, what to change."""
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake with {database} failed: {exc.reason or exc}"
    why = exc.verify_message or str(exc)
    trusted = trusted_sources(ca_pem=ca_pem, ca_file=ca_file)
    if "hostname" in why.lower() or "ip address mismatch" in why.lower():
        fix = (
            "set tls.server_name to a name the certificate holds, or tls.mode verify-ca "
            "to check the chain only"
        )
    else:
        fix = (
            "put the CA that signed it in the database's tls.ca_cert (or the agent's "
            "upstream_ca_file), or set tls.mode verify-ca / insecure"
        )
    return (
        f"cannot verify the TLS certificate of {database} ({why}) in mode {mode}, "
        f"trusting {trusted}: {fix}"
    )
