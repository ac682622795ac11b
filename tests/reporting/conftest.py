"""Fixtures of the reporting tests: a temporary data dir, the real SMTP sink process and an in-memory admin_api.

The admin_api stand-in implements only the endpoints the scheduler and the model inventory notebook call,
with the same paths, authentication headers and body shapes as the contract in docs/architecture.md.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import nbformat
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from regsandbox_core.crypto import sm3_file
from regsandbox_core.keystore import KeyStore
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import PlatformSecrets, ensure_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings
from regsandbox_core.signing import sign_object
from reporting.config import ReportSettings
from tests.conftest import free_port

INVENTORY_PATH = "notebooks/reports/model_inventory.ipynb"


def wait_for_port(port: int, deadline_seconds: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {deadline_seconds} s")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        host="127.0.0.1",
        admin_api_port=free_port(),
        smtp_port=free_port(),
        smtp_timeout=5.0,
        scheduler_poll_seconds=0.5,
    )


@pytest.fixture
def secrets(settings: Settings) -> PlatformSecrets:
    return ensure_platform_secrets(settings)


@pytest.fixture
def keystore(settings: Settings) -> KeyStore:
    """The platform key store of the data dir, which run_report opens to verify approval signatures."""
    return ensure_platform_keys(settings, [], on_event=None)


def sign_approval(keystore: KeyStore, notebook: dict[str, Any], approved_by: str = "reviewer") -> dict[str, Any]:
    """Return the approval envelope admin_api signs for ``notebook`` ``{id, name, path, digest}``."""
    return sign_object(keystore, "notebook_approval", {
        "notebook_id": notebook["id"], "name": notebook["name"], "path": notebook["path"],
        "sm3_digest": notebook["digest"], "approved_by": approved_by, "approved_at": "2026-12-01T08:00:00+00:00",
    })


@pytest.fixture
def report_settings() -> ReportSettings:
    return ReportSettings(kernel="python3", cell_timeout=60, start_timeout=60, timezone="Asia/Shanghai")


@pytest.fixture
def project_root(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "notebooks" / "reports").mkdir(parents=True)
    return root


def write_notebook(root: Path, relative: str, sources: list[str], title: str = "测试报表") -> Path:
    """Write a notebook of a markdown heading and one code cell per source; return its path."""
    cells = [new_markdown_cell(f"# {title}")]
    cells += [new_code_cell("run_id = None\nreport_date = None", metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(source) for source in sources]
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["regsandbox"] = {"title": title}
    path = root / relative
    nbformat.write(notebook, path)
    return path


def make_run(
    run_id: int, notebook_path: Path, root: Path, recipients: list[str] | None = None, schedule_id: int = 7,
    *, keystore: KeyStore | None = None,
) -> dict[str, Any]:
    """Return a run in the shape of admin_api's claim response, with the notebook's current digest.

    With ``keystore`` the run carries a signed approval of that digest, as an approved notebook has.
    """
    run = {
        "id": run_id,
        "schedule_id": schedule_id,
        "schedule_name": "每日模型清单",
        "trigger": "manual",
        "notebook": {
            "id": 3,
            "name": notebook_path.name,
            "path": notebook_path.relative_to(root).as_posix(),
            "digest": sm3_file(notebook_path),
        },
        "recipients": recipients if recipients is not None else ["reviewer@regulator.example.cn"],
    }
    if keystore is not None:
        run["approval_signature"] = sign_approval(keystore, run["notebook"])
    return run


def read_mail(settings: Settings) -> list[EmailMessage]:
    return [
        BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        for path in sorted(settings.mail_dir.glob("*.eml"))
    ]


@dataclass
class FakeAdminApi:
    """In-memory admin_api: schedules, runs, finish requests and model versions."""

    token: str
    schedules: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    notebooks: dict[int, dict[str, Any]] = field(default_factory=dict)
    rejected_requests: int = 0
    finish_failures_left: int = 0
    """Number of finish requests that get 503 before one is accepted."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def queue(self, schedule_id: int, trigger: str) -> dict[str, Any]:
        schedule = next(item for item in self.schedules if item["id"] == schedule_id)
        with self.lock:
            run_id = len(self.runs) + 1
            run = {
                "id": run_id,
                "schedule_id": schedule_id,
                "schedule_name": schedule["name"],
                "trigger": trigger,
                "status": "queued",
                "notebook": self.notebooks[schedule["notebook_id"]],
                "recipients": schedule["recipients"],
            }
            self.runs[run_id] = run
        return run

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def authenticate(request: Request, call_next):  # type: ignore[no-untyped-def]
            if (
                request.headers.get("authorization") != f"Bearer {self.token}"
                or request.headers.get("x-regsandbox-service") != "scheduler"
            ):
                self.rejected_requests += 1
                return JSONResponse({"code": "NOT_AUTHENTICATED", "detail": "未认证"}, status_code=401)
            return await call_next(request)

        @app.get("/api/v1/models")
        def list_models() -> list[dict[str, Any]]:
            return self.models

        @app.get("/api/v1/schedules")
        def list_schedules() -> list[dict[str, Any]]:
            return self.schedules

        @app.post("/api/v1/schedules/{schedule_id}/runs", status_code=201)
        def queue_run(schedule_id: int, body: dict[str, Any]) -> dict[str, Any]:
            return self.queue(schedule_id, body["trigger"])

        @app.get("/api/v1/report-runs")
        def list_runs(status: str | None = None) -> list[dict[str, Any]]:
            return [run for run in self.runs.values() if status is None or run["status"] == status]

        @app.post("/api/v1/report-runs/{run_id}/claim")
        def claim(run_id: int) -> dict[str, Any]:
            with self.lock:
                run = self.runs.get(run_id)
                if run is None or run["status"] != "queued":
                    raise HTTPException(409, "taken")
                run["status"] = "running"
            # admin_api's ClaimedRun carries the notebook as flat fields.
            notebook = run["notebook"]
            flat = {key: value for key, value in run.items() if key != "notebook"}
            flat.update(
                notebook_id=notebook["id"], notebook_name=notebook["name"], notebook_path=notebook["path"],
                approved_sm3=notebook["digest"], approval_signature=notebook.get("approval_signature"),
            )
            return flat

        @app.post("/api/v1/report-runs/{run_id}/finish")
        def finish(run_id: int, body: dict[str, Any]) -> Any:
            if self.runs[run_id]["status"] != "running":
                return JSONResponse({"code": "RUN_NOT_RUNNING", "detail": "运行不在进行中"}, status_code=409)
            if self.finish_failures_left > 0:
                self.finish_failures_left -= 1
                return JSONResponse({"code": "UNAVAILABLE", "detail": "暂不可用"}, status_code=503)
            self.runs[run_id]["status"] = body["status"]
            self.finished[run_id] = body
            return self.runs[run_id]

        return app


@pytest.fixture
def admin_api(settings: Settings, secrets: PlatformSecrets):  # type: ignore[no-untyped-def]
    fake = FakeAdminApi(token=secrets.service_token)
    server = uvicorn.Server(
        uvicorn.Config(fake.app(), host="127.0.0.1", port=settings.admin_api_port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(settings.admin_api_port)
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def smtp_sink(settings: Settings):  # type: ignore[no-untyped-def]
    """The real ``python -m reporting.smtp_sink`` process; stopped with SIGTERM, which must end it with status 0."""
    env = dict(os.environ)
    env.update(
        REGSANDBOX_DATA_DIR=str(settings.data_dir),
        REGSANDBOX_HOST="127.0.0.1",
        REGSANDBOX_SMTP_PORT=str(settings.smtp_port),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "reporting.smtp_sink"], env=env, cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_port(settings.smtp_port)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.sink_stderr = process.stderr.read()  # type: ignore[attr-defined]
    assert process.returncode == 0, process.sink_stderr


def read_archived(settings: Settings, folder: Path, name: str) -> bytes:
    """Return the plaintext of an archived report file, after checking the signed manifest and its digests."""
    import io
    import json

    from regsandbox_core.crypto import sm3_hex
    from regsandbox_core.documents import decrypt_document
    from regsandbox_core.platform_keys import open_keystore
    from regsandbox_core.signing import verify_file
    from reporting.archive import file_associated_data

    store = open_keystore(settings, on_event=None)
    assert verify_file(folder / "manifest.json", store).kind == "report_manifest"
    entry = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"][name]
    assert sm3_file(folder / entry["ciphertext"]) == entry["ciphertext_sm3"]
    output = io.BytesIO()
    decrypt_document(store, "platform", folder / entry["ciphertext"], output, file_associated_data(name))
    plaintext = output.getvalue()
    assert len(plaintext) == entry["size"]
    assert sm3_hex(plaintext) == entry["sm3"]
    return plaintext
