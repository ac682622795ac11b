"""Start, watch and stop the platform's processes, each with a pid file and a log file.

Every process runs in its own session (process group), so stopping one also stops the
children it started (configurable-http-proxy under JupyterHub, gunicorn workers under MLflow).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

log = logging.getLogger(__name__)


@dataclass
class ProcessSpec:
    """One platform process: its command, environment, working folder and readiness check."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    cwd: Path | None = None
    ready_timeout: float = 90.0
    description: str = ""
    url: str = ""


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> Callable[[], bool]:
    """Return a readiness check that passes when ``url`` returns 200."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # kill(0) succeeds on a zombie child, so read its state and treat a zombie as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


class ProcessGroup:
    """The processes started by one ``regsandbox up``, stopped in reverse order."""

    def __init__(self, run_dir: Path, logs_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs_dir = logs_dir
        self.started: list[tuple[ProcessSpec, subprocess.Popen[bytes]]] = []

    def start(self, spec: ProcessSpec) -> subprocess.Popen[bytes]:
        """Start ``spec`` and wait until its readiness check passes; raise RuntimeError otherwise."""
        log_path = self.logs_dir / f"{spec.name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append((spec, process))
        (self.run_dir / f"{spec.name}.pid").write_text(str(process.pid))
        log.info("started %s pid=%d log=%s", spec.name, process.pid, log_path)

        deadline = time.monotonic() + spec.ready_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with code {process.returncode}; see {log_path}")
            if spec.ready():
                return process
            time.sleep(0.3)
        raise RuntimeError(f"{spec.name} was not ready after {spec.ready_timeout:.0f} s; see {log_path}")

    def exited(self) -> list[tuple[ProcessSpec, int]]:
        """Return the started processes that have exited, with their exit codes."""
        return [(spec, process.returncode) for spec, process in self.started if process.poll() is not None]

    def stop_all(self, grace: float = 20.0) -> None:
        """Send SIGTERM to each process group in reverse start order, SIGKILL after ``grace`` seconds."""
        for spec, process in reversed(self.started):
            stop_process_group(process.pid, spec.name, grace)
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                log.warning("%s pid=%d did not exit", spec.name, process.pid)
            (self.run_dir / f"{spec.name}.pid").unlink(missing_ok=True)
        self.started.clear()


def stop_process_group(pid: int, name: str, grace: float = 20.0) -> None:
    """Stop the process group led by ``pid``: SIGTERM, then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not _group_alive(pid):
            log.info("stopped %s pid=%d", name, pid)
            return
        time.sleep(0.2)
    log.warning("%s pid=%d ignored SIGTERM for %.0f s, sending SIGKILL", name, pid, grace)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_pgid_of(pid) == pgid and pid_alive(pid) for pid in _all_pids())


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
