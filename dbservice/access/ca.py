"""The fleet certificate authority: create it, issue short-lived certificates, verify them.

Keys are EC P-256. The CA key stays in the CA directory on the auth host (``ca.key``,
mode 0600, directory 0700); ``ca.crt`` beside it is the certificate people distribute
and the one published to the registry.

How a client certificate carries its identity
---------------------------------------------
* Subject ``CN=<user name>, O=fleetgate``; a SAN URI ``fleetgate://user/<name>``.
* A non-critical extension with OID :data:`IDENTITY_OID` (``2.25.<uuid>``, a UUID-based
  arc that needs no registration) whose value is a DER UTF8String holding compact JSON::

      {"v": 1, "user": "alice", "roles": ["dev"], "db_users": ["alice-rw"], "kind": "user"}

  A login with an AWS identity adds ``"aws": "<the ARN STS returned>"`` (readers that
  do not know the key ignore it; a certificate without it has no AWS principal).

  Non-critical, so standard TLS stacks (OpenSSL in Python's ``ssl``) accept the
  certificate; fleetgate's verifier requires it.
* Validity: ``notBefore`` one minute in the past (clock skew), ``notAfter`` the expiry.
  Extended key usage ``clientAuth``. Server certificates (agents, the auth service) get
  ``serverAuth`` and DNS/IP SANs instead, and no identity.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from bus.access import Identity

IDENTITY_OID: Final = x509.ObjectIdentifier("2.25.125001937049832296604071541220383876583")
"""The X.509 extension holding a fleetgate identity as JSON (see the module docstring)."""

IDENTITY_VERSION: Final = 1
CA_KEY_FILE: Final = "ca.key"
CA_CERT_FILE: Final = "ca.crt"
CA_LIFETIME: Final = dt.timedelta(days=3650)
CLOCK_SKEW: Final = dt.timedelta(minutes=1)
ORGANIZATION: Final = "fleetgate"

PrivateKey = ec.EllipticCurvePrivateKey


class CertificateRejected(Exception):
    """A presented certificate is not acceptable; the message says why."""


class CAError(Exception):
    """The CA directory is missing, unreadable or would be overwritten."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; CertificateRejected when there is none."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateRejected(f"not a PEM certificate: {exc}") from None


def fingerprint(cert: x509.Certificate) -> str:
    """``SHA256:<hex>`` of the certificate's DER: what people compare out of band."""
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), replacing atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _der_utf8(text: str) -> bytes:
    body = text.encode()
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x0c" + length + body


def _undo_der_utf8(data: bytes) -> str:
    if len(data) < 2 or data[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    first = data[1]
    if first < 0x80:
        start, n = 2, first
    else:
        size = first & 0x7F
        start, n = 2 + size, int.from_bytes(data[2 : 2 + size], "big")
    if start + n != len(data):
        raise ValueError("bad DER length")
    return data[start:].decode()


def encode_identity(identity: Identity) -> bytes:
    doc = {
        "v": IDENTITY_VERSION,
        "user": identity.user,
        "roles": list(identity.roles),
        "db_users": list(identity.db_users),
        "kind": identity.kind,
    }
    if identity.aws_arn:  # only then: a certificate without it reads as before
        doc["aws"] = identity.aws_arn
    return _der_utf8(json.dumps(doc, separators=(",", ":"), sort_keys=True))


def decode_identity(cert: x509.Certificate) -> Identity:
    """The identity embedded in ``cert`` (expiry and serial from the certificate)."""
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID).value
    except x509.ExtensionNotFound:
        raise CertificateRejected("the certificate carries no fleetgate identity") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise CertificateRejected("the fleetgate identity extension is malformed")
    try:
        doc = json.loads(_undo_der_utf8(ext.value))
        return Identity(
            user=doc["user"],
            roles=tuple(doc.get("roles", ())),
            db_users=tuple(doc.get("db_users", ())),
            kind=doc.get("kind", "user"),
            aws_arn=doc.get("aws", ""),
            expires=cert.not_valid_after_utc,
            serial=format(cert.serial_number, "x"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CertificateRejected(f"the fleetgate identity is unreadable: {exc}") from None


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA's certificate and key, loaded on the auth host."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @classmethod
    def create(cls, *, name: str = "fleetgate fleet CA") -> CertificateAuthority:
        key = new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    # -- files ----------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write ``ca.key`` (0600) and ``ca.crt`` (0644) into ``directory`` (made 0700)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        write_private(directory / CA_KEY_FILE, key_pem(self.key))
        (directory / CA_CERT_FILE).write_text(self.pem)
        os.chmod(directory / CA_CERT_FILE, 0o644)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        try:
            key_data = key_path.read_bytes()
            cert_data = cert_path.read_bytes()
        except FileNotFoundError as exc:
            raise CAError(
                f"{exc.filename}: not found; create the CA with fleetgate auth init --dir "
                f"{directory} (on the auth host)"
            ) from None
        except PermissionError as exc:
            raise CAError(f"{exc.filename}: permission denied (run as the CA's owner)") from None
        if key_path.stat().st_mode & 0o077:
            raise CAError(f"{key_path}: readable by others; chmod 600 it before use")
        key = serialization.load_pem_private_key(key_data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: not an EC private key")
        cert = x509.load_pem_x509_certificate(cert_data)
        if cert.public_key() != key.public_key():
            raise CAError(f"{cert_path} does not belong to {key_path}")
        return cls(cert, key)

    # -- issuing --------------------------------------------------------------------

    def _builder(
        self, public_key: ec.EllipticCurvePublicKey, common_name: str, ttl: float
    ) -> tuple[x509.CertificateBuilder, dt.datetime]:
        now = _now()
        expires = now + dt.timedelta(seconds=ttl)
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(expires)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
        )
        return builder, expires

    def issue_client(
        self, public_key: ec.EllipticCurvePublicKey, identity: Identity, ttl: float
    ) -> x509.Certificate:
        """A client certificate for ``public_key`` carrying ``identity``, valid ``ttl`` s."""
        builder, _ = self._builder(public_key, identity.user, ttl)
        san = x509.UniformResourceIdentifier(f"fleetgate://user/{identity.user}")
        return (
            builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(
                x509.UnrecognizedExtension(IDENTITY_OID, encode_identity(identity)),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_server(
        self,
        public_key: ec.EllipticCurvePublicKey,
        hosts: Sequence[str],
        ttl: float,
        *,
        common_name: str | None = None,
    ) -> x509.Certificate:
        """A server certificate for ``hosts`` (DNS names or IP addresses). The subject CN
        is ``common_name``, else the first host (a CN holds 64 characters at most)."""
        if not hosts:
            raise ValueError("a server certificate needs at least one host name or address")
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder, _ = self._builder(public_key, common_name or hosts[0], ttl)
        return (
            builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_agent(
        self,
        public_key: ec.EllipticCurvePublicKey,
        hosts: Sequence[str],
        ttl: float,
        *,
        host_id: str,
    ) -> x509.Certificate:
        """A joined agent's certificate: a server certificate for ``hosts`` that also
        authenticates the agent to the auth service when it renews (``clientAuth``, SAN
        URI ``fleetgate://agent/<host_id>``). It carries no fleetgate identity, so agents
        and the catalog never accept it from a client."""
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        names.append(x509.UniformResourceIdentifier(f"{AGENT_URI}{host_id}"))
        builder, _ = self._builder(public_key, host_id, ttl)
        return (
            builder.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )


AGENT_URI: Final = "fleetgate://agent/"


def agent_host_id(cert: x509.Certificate) -> str | None:
    """The host_id a joined agent's certificate names (:meth:`issue_agent`), or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(AGENT_URI):
            return uri[len(AGENT_URI) :]
    return None


def csr_public_key(csr_pem: str | bytes) -> tuple[ec.EllipticCurvePublicKey, str]:
    """The EC public key of a certificate request, and its subject CN, after checking its
    signature (proof that the sender holds the private key)."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CertificateRejected("not a PEM certificate request") from None
    try:
        signed = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateRejected(
            "the certificate request must be for an EC P-256 key, signed with it"
        ) from None
    if not signed:
        raise CertificateRejected("the certificate request's signature is invalid")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CertificateRejected("the certificate request must be for an EC P-256 key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    return key, cn if isinstance(cn, str) else cn.decode()


def make_csr(key: PrivateKey, common_name: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# -- verifying (agents, clients) --------------------------------------------------------


def verify_client_certificate(
    leaf: x509.Certificate | bytes,
    trusted: Sequence[x509.Certificate],
    *,
    intermediates: Sequence[x509.Certificate] = (),
    now: dt.datetime | None = None,
) -> Identity:
    """Check that ``leaf`` (a certificate or its DER) chains to one of ``trusted`` CA
    certificates, is valid now and is for client authentication; return its identity.
    Raise CertificateRejected saying why not (expired, wrong CA, no identity...)."""
    return _verify(leaf, trusted, intermediates=intermediates, now=now)[0]


def _verify(
    leaf: x509.Certificate | bytes,
    trusted: Sequence[x509.Certificate] | Store,
    *,
    intermediates: Sequence[x509.Certificate] = (),
    now: dt.datetime | None = None,
) -> tuple[Identity, tuple[dt.datetime, dt.datetime]]:
    """:func:`verify_client_certificate`, and the time span in which every certificate of
    the verified chain (leaf and CA) is valid."""
    if isinstance(leaf, bytes):
        try:
            leaf = x509.load_der_x509_certificate(leaf)
        except ValueError:
            raise CertificateRejected("the client certificate is not valid DER") from None
    if not trusted:
        raise CertificateRejected("no fleet CA is known: run fleetgate auth init")
    when = now or _now()
    if leaf.not_valid_after_utc < when:
        raise CertificateRejected(
            f"the client certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; "
            "log in again (fleetgate login)"
        )
    if leaf.not_valid_before_utc > when:
        raise CertificateRejected("the client certificate is not valid yet (check clocks)")
    store = trusted if isinstance(trusted, Store) else Store(list(trusted))
    verifier = PolicyBuilder().store(store).time(when).build_client_verifier()
    try:
        chain = verifier.verify(leaf, list(intermediates)).chain
    except VerificationError as exc:
        raise CertificateRejected(
            f"the client certificate was not issued by this fleet's CA ({exc})"
        ) from None
    identity = decode_identity(leaf)
    valid = (
        max(cert.not_valid_before_utc for cert in chain),
        min(cert.not_valid_after_utc for cert in chain),
    )
    return identity, valid


class ClientVerifier:
    """:func:`verify_client_certificate` against fixed CA certificates, remembering the
    certificates it accepted (by their DER bytes, at most ``size``, least recently used
    first out), so a client reconnecting with the same certificate is not parsed and
    verified again. The dates are checked on every call: a remembered certificate is
    accepted only while it and its CA are valid; otherwise it is verified afresh, which
    refuses it with the usual reason. Refusals are never remembered. A new CA means a new
    verifier (nothing accepted under the old one carries over)."""

    def __init__(self, trusted: Sequence[x509.Certificate], *, size: int = 1024) -> None:
        self.trusted = tuple(trusted)
        self.size = size
        self._store = Store(list(self.trusted)) if self.trusted else None
        self._accepted: OrderedDict[bytes, tuple[Identity, dt.datetime, dt.datetime]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._accepted)

    def verify(self, der: bytes, *, now: dt.datetime | None = None) -> Identity:
        """The identity of the client certificate ``der``; CertificateRejected saying why
        not, as :func:`verify_client_certificate` does."""
        when = now or _now()
        known = self._accepted.get(der)
        if known is not None:
            identity, not_before, not_after = known
            if not_before <= when <= not_after:
                self._accepted.move_to_end(der)
                return identity
            del self._accepted[der]
        identity, (not_before, not_after) = _verify(der, self._store or (), now=when)
        self._accepted[der] = (identity, not_before, not_after)
        if len(self._accepted) > self.size:
            self._accepted.popitem(last=False)
        return identity


def identity_from_ssl(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    trusted: Sequence[x509.Certificate] | ClientVerifier,
) -> Identity:
    """The verified identity of the peer of an established mutual-TLS connection
    (``trusted``: the CA certificates, or a :class:`ClientVerifier` over them)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise CertificateRejected("no client certificate was presented")
    if isinstance(trusted, ClientVerifier):
        return trusted.verify(der)
    return verify_client_certificate(der, trusted)


def check_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def mtls_server_context(ca_pem: str, cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """A server context that requires a client certificate from the fleet CA (TLS 1.2+)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def mtls_client_context(ca_pem: str, cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """A client context presenting an identity and trusting only the fleet CA."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
