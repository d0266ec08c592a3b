"""The /dev/shm namespace is everyone's: what another user plants under an arena's
name must neither stall nor fool us.

Any user may create /dev/shm/shmcounter_1_<hex>. Arena.create sweeps leftovers of
dead creators first, and attach opens a name it is given: both must open only a
regular file of our own uid, never block (a FIFO), never follow a symlink, and
the sweep must unlink nothing else.

Each scenario runs in a forked child with a private /dev/shm (its own mount
namespace and tmpfs): a planted FIFO must not stall other programs on this
machine (an older shmcounter sweeping in another test run would block on it for
good), and whatever the child plants is gone with its namespace even if it is
killed. Needs root: for the namespace, and to own a file as another uid.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import stat
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from shmcounter import Arena
from shmcounter.segment import H_CREATOR_START, WORD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private /dev/shm "
                                "(mount namespace) and a file owned by another uid")

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
NOBODY = 65534
# No process has this pid: Linux caps pid_max at 2**22.
NO_SUCH_PID = 2**22 + 1
CREATORS = {"alive": 1, "dead": NO_SUCH_PID}          # pid 1 always runs
BOUND = 20.0                                            # seconds a call may take here
SKIP = 77                                               # the child's exit code: cannot unshare


def _private_dev_shm() -> None:
    """Give this (single-threaded, forked) process its own empty /dev/shm."""
    libc = ctypes.CDLL(None, use_errno=True)
    for rc in (libc.unshare(CLONE_NEWNS),
               libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
               libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0, b"mode=1777")):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def in_private_dev_shm(scenario: Callable[..., None], *args: Any, timeout: float = 90) -> None:
    """Run scenario(*args) in a forked child with a private /dev/shm; fail here
    with the child's traceback if it fails, or if it is not done in `timeout` s."""
    with tempfile.TemporaryFile() as report:
        pid = os.fork()
        if pid == 0:                                    # the child: never returns
            code = 1
            try:
                try:
                    _private_dev_shm()
                except OSError:
                    code = SKIP
                    raise
                scenario(*args)
                code = 0
            except BaseException:
                report.write(traceback.format_exc().encode())
                report.flush()
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the scenario did not end within {timeout} s")
            time.sleep(0.01)
        report.seek(0)
        code = os.waitstatus_to_exitcode(done[1])
        if code == SKIP:
            pytest.skip("no private /dev/shm here (mount namespace):\n" + report.read().decode())
        if code != 0:
            pytest.fail("in the child:\n" + report.read().decode())


def outcome(call: Callable[[], object]) -> str:
    """What call() did within BOUND seconds: "returned", "<exception type>: <message>",
    or "blocked" (it runs in a daemon thread, which dies with the scenario's process)."""
    out: list[str] = []

    def run() -> None:
        try:
            call()
            out.append("returned")
        except BaseException as exc:
            out.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND)
    return out[0] if out else "blocked"


def _plant(live: Arena, pid: int) -> dict[str, str]:
    """Put one of each trap under an arena name of creator `pid` in /dev/shm;
    returns {name: kind}. The symlink points at `live`, a real arena of ours;
    the other uid's file is a copy of it whose header names a creator that never
    ran (start time -1), so it looks like a dead creator's arena."""
    kinds = {}
    for kind in ("FIFO", "symbolic link", "directory", "file of uid 65534"):
        name = f"shmcounter_{pid}_{secrets.token_hex(4)}"
        path = f"/dev/shm/{name}"
        if kind == "FIFO":
            os.mkfifo(path, 0o600)
        elif kind == "symbolic link":
            os.symlink(f"/dev/shm/{live.name}", path)
        elif kind == "directory":
            os.mkdir(path, 0o700)
        else:
            shutil.copyfile(f"/dev/shm/{live.name}", path)
            with open(path, "r+b") as f:
                f.seek(H_CREATOR_START * WORD)
                f.write(struct.pack("<q", -1))
            os.chmod(path, 0o600)
            os.chown(path, NOBODY, NOBODY)
        kinds[name] = kind
    return kinds


def _what_is(name: str) -> str | None:
    """The kind of /dev/shm/`name`, as _plant names it, or None if it is gone."""
    try:
        st = os.lstat(f"/dev/shm/{name}")
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return f"file of uid {st.st_uid}"
    return {stat.S_IFIFO: "FIFO", stat.S_IFLNK: "symbolic link",
            stat.S_IFDIR: "directory"}.get(stat.S_IFMT(st.st_mode), "something else")


def _remove(kinds: dict[str, str]) -> None:
    for name, kind in kinds.items():
        path = f"/dev/shm/{name}"
        if os.path.lexists(path):
            (os.rmdir if kind == "directory" else os.unlink)(path)


def _create_and_unlink() -> None:
    with Arena.create(ncpus=1, max_counters=1):
        pass


def _create_sweeps_around_traps(pid: int) -> None:
    live = Arena.create(ncpus=1, max_counters=1)
    kinds = _plant(live, pid)
    try:
        # Arena.create sweeps first: it must come back, and leave every trap alone.
        assert outcome(_create_and_unlink) == "returned"
        assert {name: _what_is(name) for name in kinds} == kinds
        assert os.path.exists(f"/dev/shm/{live.name}")
    finally:
        _remove(kinds)
        live.close()
        live.unlink()


@pytest.mark.parametrize("creator", sorted(CREATORS))
def test_create_returns_and_the_sweep_leaves_what_is_not_our_arena(creator):
    in_private_dev_shm(_create_sweeps_around_traps, CREATORS[creator])


REASONS = {
    "FIFO": "{name!r} in /dev/shm is a FIFO, not a shared-memory segment",
    "symbolic link": "{name!r} in /dev/shm is a symbolic link, not a shared-memory segment",
    "directory": "{name!r} in /dev/shm is a directory, not a shared-memory segment",
    "file of uid 65534": "segment {name!r} is owned by uid 65534, not by this process's "
                         "uid 0: refused",
}


def _attach_refuses_traps() -> None:
    live = Arena.create(ncpus=1, max_counters=1)
    kinds = _plant(live, NO_SUCH_PID)
    try:
        got = {kind: outcome(lambda: Arena.attach(name).close())  # noqa: B023 (called at once)
               for name, kind in kinds.items()}
        assert got == {kind: "ArenaError: " + REASONS[kind].format(name=name)
                       for name, kind in kinds.items()}
        assert {name: _what_is(name) for name in kinds} == kinds
    finally:
        _remove(kinds)
        live.close()
        live.unlink()


def test_attach_refuses_a_fifo_a_symlink_a_directory_and_another_uids_file():
    in_private_dev_shm(_attach_refuses_traps)

