"""Password hashes (argon2id) and the optional TOTP second factor (RFC 6238)."""

from __future__ import annotations

import base64
import secrets
import time
from typing import Final
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.totp import TOTP

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


def _totp(secret: str) -> TOTP:
    """RFC 6238 with the parameters authenticator apps assume: HMAC-SHA1, 6 digits, 30 s.
    ``secret`` is base32 as :func:`new_totp_secret` makes it (padding and case free)."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8), casefold=True)
    # Keys shorter than the 128 bits RFC 4226 asks for are accepted, as before.
    return TOTP(key, TOTP_DIGITS, SHA1(), TOTP_STEP, enforce_key_length=False)


def totp_code(secret: str, at: float | None = None) -> str:
    """The code for the time step of ``at`` (default: now)."""
    counter = int((time.time() if at is None else at) // TOTP_STEP)
    return _totp(secret).generate(counter * TOTP_STEP).decode()


def verify_totp(secret: str, code: str, at: float | None = None) -> bool:
    """Whether ``code`` is valid now, or one step either side (clock drift)."""
    return totp_step(secret, code, at) is not None


def totp_step(secret: str, code: str, at: float | None = None) -> int | None:
    """The time step ``code`` belongs to when it is valid now or one step either side
    (clock drift), else None. A verifier keeps the last step accepted per user and
    refuses a code of that step or an earlier one: a code works once (RFC 6238, 5.2)."""
    now = time.time() if at is None else at
    given = code.strip().encode()
    counter = int(now // TOTP_STEP)
    totp = _totp(secret)
    for step in (-1, 0, 1):
        try:
            totp.verify(given, (counter + step) * TOTP_STEP)  # compares in constant time
        except InvalidToken:
            continue
        return counter + step
    return None
