"""Password hashes (argon2id) and the optional TOTP second factor (RFC 6238)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
from typing import Final
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER: Final = PasswordHasher()  # argon2id, 64 MiB, 3 passes: the library's defaults
_DUMMY_HASH: Final = _HASHER.hash(secrets.token_urlsafe(16))

MIN_PASSWORD_LENGTH: Final = 8
TOTP_STEP: Final = 30
TOTP_DIGITS: Final = 6


def hash_password(password: str) -> str:
    """A salted argon2id hash (PHC string) of ``password``."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; an absent hash still costs one verification, so
    unknown users and users without passwords take as long as wrong passwords."""
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


def new_totp_secret() -> str:
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def totp_uri(secret: str, user: str, issuer: str = "fleetgate") -> str:
    """The ``otpauth://`` URI authenticator apps import (often shown as a QR code)."""
    return (
        f"otpauth://totp/{quote(issuer)}:{quote(user)}?secret={secret}&issuer={quote(issuer)}"
        f"&digits={TOTP_DIGITS}&period={TOTP_STEP}"
    )


def totp_code(secret: str, at: float | None = None) -> str:
    padded = secret + "=" * (-len(secret) % 8)
    key = base64.b32decode(padded, casefold=True)
    counter = int((time.time() if at is None else at) // TOTP_STEP)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def verify_totp(secret: str, code: str, at: float | None = None) -> bool:
    """Whether ``code`` is valid now, or one step either side (clock drift)."""
    return totp_step(secret, code, at) is not None


def totp_step(secret: str, code: str, at: float | None = None) -> int | None:
    """The time step ``code`` belongs to when it is valid now or one step either side
    (clock drift), else None. A verifier keeps the last step accepted per user and
    refuses a code of that step or an earlier one: a code works once (RFC 6238, 5.2)."""
    now = time.time() if at is None else at
    code = code.strip()
    counter = int(now // TOTP_STEP)
    for step in (-1, 0, 1):
        if hmac.compare_digest(totp_code(secret, (counter + step) * TOTP_STEP), code):
            return counter + step
    return None
