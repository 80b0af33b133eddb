"""NATS credentials made offline for tests: NKey seeds, and a decentralized-auth
(operator -> account -> user) chain of JWTs with a ``.creds`` file, the way ``nsc``
makes them, built with the ``nkeys`` library alone.

A server trusts the chain with :meth:`Operator.server_config` (operator JWT, a memory
resolver preloaded with the account JWT); :meth:`Operator.creds` writes a user's
``.creds`` file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys


def new_seed(prefix: int = nkeys.PREFIX_BYTE_USER) -> bytes:
    """A fresh NKey seed (``SU...`` for a user; ``SO``/``SA`` for operator/account)."""
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(seed: bytes) -> str:
    pair = nkeys.from_seed(bytearray(seed))
    try:
        return str(pair.public_key.decode())
    finally:
        pair.wipe()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(claims: dict[str, Any], signer_seed: bytes) -> str:
    """A NATS JWT (``ed25519-nkey``) of ``claims`` signed by ``signer_seed``, with
    ``iss``, ``iat`` and ``jti`` filled in as nsc does."""
    body = {**claims, "iat": int(time.time()), "iss": public_key(signer_seed)}
    body["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    pair = nkeys.from_seed(bytearray(signer_seed))
    try:
        signature = pair.sign(f"{header}.{payload}".encode())
    finally:
        pair.wipe()
    return f"{header}.{payload}.{_b64(signature)}"


UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}
"""An account's limits: none, JetStream enabled."""


@dataclass
class Operator:
    """An operator with one account; users are issued by the account."""

    seed: bytes = field(default_factory=lambda: new_seed(nkeys.PREFIX_BYTE_OPERATOR))
    account_seed: bytes = field(default_factory=lambda: new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    system_seed: bytes = field(default_factory=lambda: new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    """The system account (JetStream needs one in operator mode)."""

    @property
    def account(self) -> str:
        return public_key(self.account_seed)

    def jwt(self) -> str:
        pub = public_key(self.seed)
        return encode_jwt(
            {"sub": pub, "name": "test-operator", "nats": {"type": "operator", "version": 2}},
            self.seed,
        )

    def account_jwt(self) -> str:
        claims = {
            "sub": self.account,
            "name": "fleetgate",
            "nats": {"type": "account", "version": 2, "limits": UNLIMITED},
        }
        return encode_jwt(claims, self.seed)

    def system_jwt(self) -> str:
        claims = {
            "sub": public_key(self.system_seed),
            "name": "SYS",
            "nats": {"type": "account", "version": 2},
        }
        return encode_jwt(claims, self.seed)

    def user_jwt(
        self, user_seed: bytes, name: str, permissions: dict[str, Any] | None = None
    ) -> str:
        nats: dict[str, Any] = {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}
        nats |= permissions or {}
        claims = {"sub": public_key(user_seed), "name": name, "nats": nats}
        return encode_jwt(claims, self.account_seed)

    def creds(self, path: Path, name: str, permissions: dict[str, Any] | None = None) -> Path:
        """Write a ``.creds`` file for a new user ``name`` (mode 0600)."""
        seed = new_seed()
        text = (
            "-----BEGIN NATS USER JWT-----\n"
            f"{self.user_jwt(seed, name, permissions)}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        path.write_text(text)
        path.chmod(0o600)
        return path

    def server_config(self, directory: Path) -> str:
        """nats-server config text trusting this operator (JetStream on the account)."""
        operator_file = directory / "operator.jwt"
        operator_file.write_text(self.jwt())
        system = public_key(self.system_seed)
        return (
            f'operator: "{operator_file}"\n'
            f"system_account: {system}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  {self.account}: "{self.account_jwt()}"\n'
            f'  {system}: "{self.system_jwt()}"\n'
            "}\n"
        )
