"""The whole platform started with `regsandbox up` on free ports and a temporary data directory."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGSANDBOX = str(Path(sys.executable).parent / "regsandbox")
UNIX_PREFIX = "rst-"


@dataclass
class Platform:
    """A running platform: its environment, URLs, data directory and first credentials."""

    env: dict[str, str]
    data_dir: Path
    backend: str
    admin_api_url: str
    hub_url: str
    mlflow_url: str
    smtp_port: int
    credentials: dict[str, str]
    process: subprocess.Popen
    output_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def output(self) -> str:
        return self.output_path.read_text(encoding="utf-8", errors="replace")

    def regsandbox(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([REGSANDBOX, *args], env=self.env, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=180, check=check)


def _remove_test_unix_accounts() -> None:
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(UNIX_PREFIX):
            subprocess.run(["userdel", "--remove", entry.pw_name], capture_output=True)
    for entry in grp.getgrall():
        if entry.gr_name.startswith(UNIX_PREFIX):
            subprocess.run(["groupdel", entry.gr_name], capture_output=True)


def _read_credentials(path: Path) -> dict[str, str]:
    credentials = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "\t" in line and not line.startswith("#"):
            user, password = line.split("\t", 1)
            credentials[user] = password
    return credentials


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def platform(request, postgres_database_factory) -> Iterator[Platform]:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end walk-through checks Unix isolation and must run as root")
    _remove_test_unix_accounts()

    # pytest's own temporary folders are 0700; sandbox users must traverse to their extract.
    data_dir = Path(tempfile.mkdtemp(prefix="rs-e2e-"))
    os.chmod(data_dir, 0o711)
    homes = data_dir.parent / f"{data_dir.name}-homes"
    homes.mkdir(mode=0o711)

    ports = {name: free_port() for name in ("ADMIN_API", "HUB", "HUB_API", "PROXY_API", "MLFLOW", "SMTP")}
    env = dict(os.environ)
    env.update({f"REGSANDBOX_{name}_PORT": str(port) for name, port in ports.items()})
    env.update({
        "REGSANDBOX_DATA_DIR": str(data_dir),
        "REGSANDBOX_UNIX_PREFIX": UNIX_PREFIX,
        "REGSANDBOX_SANDBOX_HOME_ROOT": str(homes),
        "REGSANDBOX_SCHEDULER_POLL_SECONDS": "1",
        "REGSANDBOX_TOTP_REQUIRED_ROLES": "[]",  # the walkthrough signs in with the printed passwords only
    })
    if request.param == "postgres":
        env["REGSANDBOX_DATABASE_URL"] = postgres_database_factory()

    output_path = data_dir.parent / f"{data_dir.name}-up.log"
    with open(output_path, "wb") as output:
        process = subprocess.Popen([REGSANDBOX, "up"], env=env, cwd=PROJECT_ROOT, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    platform = Platform(
        env=env, data_dir=data_dir, backend=request.param,
        admin_api_url=f"http://127.0.0.1:{ports['ADMIN_API']}", hub_url=f"http://127.0.0.1:{ports['HUB']}",
        mlflow_url=f"http://127.0.0.1:{ports['MLFLOW']}", smtp_port=ports["SMTP"], credentials={},
        process=process, output_path=output_path, ports=ports,
    )
    deadline = time.monotonic() + 300
    while "平台已启动" not in platform.output():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"regsandbox up did not start:\n{platform.output()[-4000:]}")
        time.sleep(1)
    platform.credentials = _read_credentials(data_dir / "credentials.txt")

    try:
        yield platform
    finally:
        if process.poll() is None:
            platform.regsandbox("down", check=False)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        _remove_test_unix_accounts()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(homes, ignore_errors=True)
        output_path.unlink(missing_ok=True)
