"""RunLock: one run per output directory."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from halokit.errors import UserError
from halokit.lock import RunLock


def test_run_lock_refuses_a_second_run_and_cleans_up(tmp_path):
    lock_file = tmp_path / "run" / ".lock"
    second = f"from halokit.lock import RunLock\nwith RunLock({str(tmp_path / 'run')!r}): pass"
    with RunLock(tmp_path / "run"):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        refused = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        assert re.search(rf"{re.escape(str(tmp_path / 'run'))} is in use .*pid {os.getpid()}", refused.stderr)
        assert lock_file.exists()  # the refused second lock must not remove the first
    assert not lock_file.exists()


def test_run_lock_is_reentrant_within_a_process(tmp_path):
    """The CLI holds the lock while it prepares the directory; train() takes it again inside."""
    with RunLock(tmp_path) as outer:
        token = json.loads((tmp_path / ".lock").read_text())["token"]
        with RunLock(tmp_path):
            pass
        assert json.loads((tmp_path / ".lock").read_text())["token"] == token == outer._token
    assert not (tmp_path / ".lock").exists()


def test_run_lock_takes_over_a_dead_process_lock(tmp_path):
    dead_pid = 2**22 + 12345
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid, "hostname": socket.gethostname(), "time": "x"}))
    with pytest.warns(UserWarning, match=f"stale lock .* process {dead_pid}"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_run_lock_from_another_host_or_unreadable_is_not_taken(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "hostname": "elsewhere", "time": "x"}))
    with pytest.raises(UserError, match="pid 4206649 on elsewhere"):
        RunLock(tmp_path).__enter__()
    (tmp_path / ".lock").write_text("")
    with pytest.raises(UserError, match="cannot be read"):
        RunLock(tmp_path).__enter__()
