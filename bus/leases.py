"""Compare-and-set records on the bus, for state several agents share (the managed-user
records in :data:`~bus.subjects.LEASES_BUCKET`).

A record is read with its revision and written back only if nobody wrote it since:
:func:`create` succeeds only when the key is absent, :func:`update` only when the key is
still at the revision read. Either returns None when another writer won, so exactly
one of several agents racing for the same change goes ahead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel

from bus import subjects
from bus.client import BUCKETS, Bus, decode
from bus.errors import RegistryError
from bus.specs import BucketSpec
from bus.watch import describe

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

LEASES: BucketSpec = BucketSpec(
    subjects.LEASES_BUCKET,
    "fleetgate managed MemoryDB users: versions, rotation leases (written by agents)",
    history=1,
)

_SPECS: dict[str, BucketSpec] = {LEASES.name: LEASES}
"""Buckets written by compare-and-set, kept apart from :data:`~bus.client.BUCKETS` (which
every process provisions), by name: whichever call opens one first creates it with its
own spec (history, expiry)."""


def register(spec: BucketSpec) -> BucketSpec:
    """Make ``spec`` the one this module creates bucket ``spec.name`` with."""
    _SPECS[spec.name] = spec
    return spec


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A record and the revision it was read at."""

    record: T
    revision: int


def _encode(record: BaseModel) -> bytes:
    return record.model_dump_json(exclude_none=True).encode()


async def _kv(bus: Bus, bucket: str) -> KeyValue:
    """The bucket, opened (and created with its own spec) on first use."""
    kv = bus._buckets.get(bucket)
    if kv is None:
        spec = _SPECS.get(bucket) or BUCKETS.get(bucket) or BucketSpec(bucket, bucket)
        kv = await bus._open(spec, create=True)
    return kv


@contextlib.asynccontextmanager
async def _call(bus: Bus, what: str, bucket: str, key: str) -> AsyncIterator[None]:
    """One KV call: silence and refusals become :class:`RegistryError`. After a failure
    the bucket is opened again on the next call (and created again, should NATS have
    lost its store: a missing stream answers like a refusal, with no responders)."""
    try:
        async with bus._kv_call(what, bucket, key):
            yield
    except RegistryError:
        bus._buckets.pop(bucket, None)
        raise
    except nats.errors.Error as exc:
        bus._buckets.pop(bucket, None)
        raise RegistryError(f"{what} {bucket}/{key} failed: {describe(exc)}") from exc


async def read(bus: Bus, bucket: str, key: str, model: type[M]) -> Versioned[M] | None:
    """The record at ``key`` with its revision; None when absent, deleted or unreadable."""
    kv = await _kv(bus, bucket)
    async with _call(bus, "a read of", bucket, key):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is one too
            return None
    record = decode(model, key, entry.value or b"")
    if record is None or entry.revision is None:
        return None
    return Versioned(record, int(entry.revision))


async def create(bus: Bus, bucket: str, key: str, record: BaseModel) -> int | None:
    """Write ``record`` only if ``key`` holds nothing; its revision, or None if it does."""
    kv = await _kv(bus, bucket)
    async with _call(bus, "a write to", bucket, key):
        try:
            return int(await kv.create(key, _encode(record)))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None


async def update(bus: Bus, bucket: str, key: str, record: BaseModel, *, last: int) -> int | None:
    """Write ``record`` only if ``key`` is still at revision ``last``; the new revision,
    or None when someone else wrote it in between."""
    kv = await _kv(bus, bucket)
    async with _call(bus, "a write to", bucket, key):
        try:
            return int(await kv.update(key, _encode(record), last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None


async def records(bus: Bus, bucket: str, model: type[M]) -> dict[str, Versioned[M]]:
    """Every readable record of ``bucket`` by key (one-shot; fails with a reason)."""
    out: dict[str, Versioned[M]] = {}
    kv = await _kv(bus, bucket)
    async with _call(bus, "a listing of", bucket, "*"):
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return out
    for key in keys:
        found = await read(bus, bucket, key, model)
        if found is not None:
            out[key] = found
    return out


async def delete(bus: Bus, bucket: str, key: str, *, last: int) -> bool:
    """Delete ``key`` only if it is still at revision ``last``; False when it moved on."""
    kv = await _kv(bus, bucket)
    async with _call(bus, "a delete in", bucket, key):
        try:
            return bool(await kv.delete(key, last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
