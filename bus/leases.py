"""Compare-and-set records on the bus, for state several processes share (the managed-user
records in :data:`~bus.subjects.LEASES_BUCKET`, discovery's leases, the registry writes
of a discovery replica).

A record is read with its revision and written back only if nobody wrote it since:
:func:`create` succeeds only when the key is absent, :func:`update` only when the key is
still at the revision read. Either returns None when another writer won, so exactly
one of several agents racing for the same change goes ahead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.js.errors
from pydantic import BaseModel

from bus import specs
from bus.client import Bus, decode

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a compare-and-set that lost (the key moved on)."""

LEASES = specs.LEASES
"""The managed-user records' bucket (its spec lives with every other in :mod:`bus.specs`)."""


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A record and the revision it was read at."""

    record: T
    revision: int


def _encode(record: BaseModel) -> bytes:
    return record.model_dump_json(exclude_none=True).encode()


async def read(bus: Bus, bucket: str, key: str, model: type[M]) -> Versioned[M] | None:
    """The record at ``key`` with its revision; None when absent, deleted or unreadable."""
    kv = await bus.bucket(bucket)
    async with bus.kv_call("a read of", bucket, key, reopen=True):
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
    kv = await bus.bucket(bucket)
    async with bus.kv_call("a write to", bucket, key, reopen=True):
        try:
            return int(await kv.create(key, _encode(record)))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None


async def update(bus: Bus, bucket: str, key: str, record: BaseModel, *, last: int) -> int | None:
    """Write ``record`` only if ``key`` is still at revision ``last``; the new revision,
    or None when someone else wrote it in between."""
    kv = await bus.bucket(bucket)
    async with bus.kv_call("a write to", bucket, key, reopen=True):
        try:
            return int(await kv.update(key, _encode(record), last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None


async def records(bus: Bus, bucket: str, model: type[M]) -> dict[str, Versioned[M]]:
    """Every readable record of ``bucket`` by key (one-shot; fails with a reason): one
    watch, as :func:`snapshot` reads it (nats-py's ``KeyValue.keys`` waits without a
    deadline and leaves its consumer on the server for five minutes)."""
    return await snapshot(bus, bucket, model)


async def snapshot(
    bus: Bus, bucket: str, model: type[M], *, keys: str = ">", create: bool = True
) -> dict[str, Versioned[M]]:
    """Every readable record of ``bucket`` (or of the ``keys`` filter) with its revision,
    read through one watch (one round trip for the whole bucket, unlike :func:`records`);
    fails with a reason instead of retrying (also when the bucket does not exist and
    ``create`` is False)."""
    out: dict[str, Versioned[M]] = {}
    watch = bus.watch(bucket, model, keys=keys, create=create, retry_open=False)
    async with contextlib.aclosing(watch) as events:
        async for event in events:
            if event.kind == "synced":
                break
            if event.kind == "upsert" and event.value is not None:
                out[event.key] = Versioned(event.value, event.revision)
    return out


async def delete(bus: Bus, bucket: str, key: str, *, last: int) -> bool:
    """Delete ``key`` only if it is still at revision ``last``; False when it moved on."""
    kv = await bus.bucket(bucket)
    async with bus.kv_call("a delete in", bucket, key, reopen=True):
        try:
            return bool(await kv.delete(key, last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.js.errors.BadRequestError as exc:
            # nats-py's delete, unlike its update, passes the server's "wrong last
            # sequence" on as it came
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return False
            raise
