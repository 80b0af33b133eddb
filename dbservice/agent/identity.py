"""The agent's data directory: its persistent host_id, and a lock so two agents never
share one (they would overwrite each other's heartbeats)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from typing import IO

from fleetgate.config import ConfigError

HOST_ID_FILE = "host_uuid"
LOCK_FILE = "agent.lock"


class DataDir:
    """Open with :meth:`open`; holds the lock until :meth:`close`."""

    def __init__(self, path: Path, host_id: str, lock: IO[bytes]) -> None:
        self.path = path
        self.host_id = host_id
        self._lock: IO[bytes] | None = lock

    @classmethod
    def open(cls, path: Path) -> DataDir:
        where = f"db_service.data_dir {path}"
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = (path / LOCK_FILE).open("ab")
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot use it ({exc.strerror or exc}); set data_dir to a "
                "directory this user can write"
            ) from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ConfigError(
                f"{where}: another agent is running with this data_dir; give each agent its own"
            ) from None
        try:
            host_id = _load_or_create(path / HOST_ID_FILE)
        except BaseException:
            lock.close()
            raise
        return cls(path, host_id, lock)

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()


def _load_or_create(file: Path) -> str:
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        host_id = str(uuid.uuid4())
        tmp = file.with_suffix(".tmp")
        try:
            tmp.write_text(host_id + "\n")
            os.replace(tmp, file)
        except OSError as exc:
            raise ConfigError(f"{file}: cannot write the host id ({exc.strerror})") from None
        return host_id
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the host id ({exc.strerror})") from None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ConfigError(
            f"{file}: not a host id (a UUID); delete the file to get a new one"
        ) from None
