"""The stand-in's resharding: a slot moves to another primary, keys and all, while a
cluster-aware client keeps writing and reading it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import MovedError

from dbservice.engine.cluster.slots import key_slot
from sandbox.memorydb import StandinConfig, ThreadedStandin


def keys_in_slot(slot: int, count: int) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < count:
        key = b"k%d" % i
        if key_slot(key) == slot:
            out.append(key)
        i += 1
    return out


def test_move_slot_while_a_client_writes(tmp_path: Path) -> None:
    config = StandinConfig(dir=tmp_path, shards=3, replicas=1)
    with ThreadedStandin(config) as standin:
        host, port = standin.endpoint
        client = RedisCluster(
            host=host, port=port, ssl=True, ssl_ca_certs=str(standin.ca_file), socket_timeout=5
        )
        try:
            slot = key_slot(b"moving")
            tag = b"{moving}"
            for i in range(500):
                client.set(tag + b"%d" % i, b"%d" % i)
            before = standin.owner_of_slot(slot)
            target = (before + 1) % 3
            stop, errors, written = threading.Event(), list[Exception](), [0]

            def writer() -> None:
                i = 500
                while not stop.is_set():
                    try:
                        client.set(tag + b"%d" % i, b"%d" % i)
                        assert client.get(tag + b"%d" % (i // 2)) == b"%d" % (i // 2)
                    except (redis.RedisError, AssertionError) as exc:
                        errors.append(exc)
                        return
                    i += 1
                written[0] = i

            thread = threading.Thread(target=writer)
            thread.start()
            try:
                moved = standin.move_slot(slot, target, batch=50)
            finally:
                stop.set()
                thread.join(10)
            assert not errors
            assert moved >= 500
            assert standin.owner_of_slot(slot) == target
            for i in range(written[0]):
                assert client.get(tag + b"%d" % i) == b"%d" % i
            # the old owner redirects, the new one serves
            old_host, old_port = standin.node_fronts[before]
            with (
                redis.Redis(old_host, old_port, ssl=True, ssl_ca_certs=str(standin.ca_file)) as old,
                pytest.raises(MovedError),
            ):
                old.get(tag + b"0")
            assert standin.move_slot(slot, target) == 0
        finally:
            client.close()
