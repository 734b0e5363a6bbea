"""One run per directory: a lock file that a second run on the same output_dir refuses to share."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, ClassVar

from halokit.errors import UserError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds ``RUN_DIR/.lock`` so that two runs never share a directory.

    The lock file is created with O_CREAT|O_EXCL and holds the pid, hostname and start time. A lock
    left by a dead process on this host is taken over with a warning; a live one (or one from another
    host, whose pid cannot be checked) raises UserError naming the directory and the holder's pid.
    Take it on the main process only. The file is removed on exit if it is still ours.

    Re-entrant within a process: the CLI takes the lock before it writes anything into the directory,
    and :func:`halokit.train.train` takes it again; the inner ``with`` does nothing.
    """

    _held: ClassVar[dict[Path, int]] = {}  # directories this process holds -> nesting depth

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._token = uuid.uuid4().hex
        self._key: Path | None = None

    def __enter__(self) -> RunLock:
        key = self.run_dir.resolve()
        if key in RunLock._held:
            RunLock._held[key] += 1
            self._key = key
            return self
        self._acquire()
        RunLock._held[key] = 1
        self._key = key
        return self

    def __exit__(self, *exc: object) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        RunLock._held[key] -= 1
        if RunLock._held[key] > 0:
            return
        del RunLock._held[key]
        holder = self._holder()
        if holder is not None and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def _acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._create()
        except FileExistsError:
            holder = self._holder()
            if holder is None:
                raise UserError(f"{self.run_dir} is locked by {self.path}, which cannot be read; "
                                "delete it if no other run uses this directory") from None
            pid, host = holder.get("pid"), holder.get("hostname")
            if host != socket.gethostname() or not isinstance(pid, int) or _pid_alive(pid):
                raise UserError(f"{self.run_dir} is in use by another halokit run (pid {pid} on {host}, since "
                                f"{holder.get('time')}); delete {self.path} if that run is gone") from None
            warnings.warn(f"taking over the stale lock {self.path} of process {pid}, which no longer runs",
                          stacklevel=3)
            self.path.unlink(missing_ok=True)
            try:
                self._create()
            except FileExistsError:
                raise UserError(f"{self.run_dir} was just locked by another halokit run") from None
        except OSError as e:
            raise UserError(f"cannot create the lock file {self.path} ({e.strerror or e})") from e

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        info = {"pid": os.getpid(), "hostname": socket.gethostname(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self._token}
        try:
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None
