"""The spawner's check of the published extract before a start, called directly without a running hub.

A real extract of bank_a is built once; each test works on a copy of the data directory. Audit
events go to a small HTTP server on 127.0.0.1 that records what the spawner posts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest
from jupyterhub.spawner import SpawnException
from traitlets.config.loader import PyFileConfigLoader

from extracts.builder import build_extract
from extracts.demo_data import load_demo
from hub_config.spawner import InstitutionSpawner, check_published_extract
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import ensure_platform_secrets, load_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings
from regsandbox_core.sm import generate_sm2_keypair
from tests.hub_config.extract_files import write_extract
from tests.extract_setup import approve_shipped_policy


class AuditRecorder(BaseHTTPRequestHandler):
    """Stores each POST body with its Authorization header and responds with 201, as admin_api does."""

    received: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers.get("Authorization", ""), body))
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


class FakeUser:
    """The two members of a hub user that the spawner reads before a start."""

    def __init__(self, name: str, auth_state: dict) -> None:
        self.name = name
        self._auth_state = auth_state

    async def get_auth_state(self) -> dict:
        return self._auth_state


@pytest.fixture(scope="module")
def built_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = Settings(data_dir=tmp_path_factory.mktemp("spawn-check"))
    load_demo(settings)
    ensure_platform_keys(settings, ["bank_a", "bank_b"], on_event=None)
    approve_shipped_policy(settings)
    ensure_platform_secrets(settings)
    build_extract(settings, "bank_a")
    return settings.data_dir


@pytest.fixture(scope="module")
def audit_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), AuditRecorder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture
def settings(built_data: Path, tmp_path: Path, audit_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings of a copy of the built data directory, also seen by get_settings() as the hub's own."""
    copy = tmp_path / "data"
    shutil.copytree(built_data, copy, symlinks=True)
    monkeypatch.setenv("REGSANDBOX_DATA_DIR", str(copy))
    monkeypatch.setenv("REGSANDBOX_ADMIN_API_PORT", audit_server.rsplit(":", 1)[1])
    get_settings.cache_clear()
    AuditRecorder.received.clear()
    yield get_settings()
    get_settings.cache_clear()


def spawner(audit_server: str, **traits: object) -> InstitutionSpawner:
    return InstitutionSpawner(user=FakeUser("alice", {}), admin_api_url=audit_server, **traits)


def refusal(audit_server: str, **traits: object) -> SpawnException:
    with pytest.raises(SpawnException) as raised:
        asyncio.run(spawner(audit_server, **traits).check_extract("modeller", "bank_a"))
    return raised.value


def posted_detail(settings: Settings) -> dict:
    """Return the detail of the one audit event posted, after checking its envelope."""
    ((authorization, event),) = AuditRecorder.received
    assert authorization == f"Bearer {load_platform_secrets(settings).service_token}"
    assert (event["action"], event["outcome"], event["actor"]) == ("sandbox.spawn", "denied", "alice")
    assert (event["role"], event["institution_code"], event["resource"]) == ("modeller", "bank_a", "sandbox:alice")
    return json.loads(event["detail"])


def bank_a(settings: Settings) -> Path:
    return Path(os.path.realpath(settings.extracts_dir / "bank_a"))


def test_signed_extract_passes(settings: Settings, audit_server: str) -> None:
    build = asyncio.run(spawner(audit_server).check_extract("modeller", "bank_a"))

    assert build == bank_a(settings).name
    assert AuditRecorder.received == []


def test_edited_manifest_refused(settings: Settings, audit_server: str) -> None:
    path = bank_a(settings) / "manifest.json"
    document = json.loads(path.read_text("utf-8"))
    document["tables"][0]["row_count"] += 1
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")

    error = refusal(audit_server)

    assert error.status_code == 500
    assert "bank_a 的数据提取未通过完整性校验" in error.message
    assert "签名验证失败" in error.message
    detail = posted_detail(settings)
    assert (detail["code"], detail["cause"]) == ("EXTRACT_MANIFEST_INVALID", "MANIFEST_SIGNATURE_INVALID")
    assert "签名验证失败" in detail["message"]


def test_missing_signature_refused(settings: Settings, audit_server: str) -> None:
    (bank_a(settings) / "manifest.json.sig").unlink()

    error = refusal(audit_server)

    assert "manifest.json.sig" in error.message
    assert posted_detail(settings)["cause"] == "MANIFEST_SIGNATURE_INVALID"


def test_untrusted_key_refused(settings: Settings, audit_server: str) -> None:
    keys = settings.extracts_dir / "platform_signing_keys.json"
    other = generate_sm2_keypair().public_key.hex()
    keys.write_text(json.dumps({"format": "regsandbox-trusted-keys/1", "keys": {"platform/signing/v1": other}}))
    os.chmod(keys, 0o644)

    refusal(audit_server)

    assert posted_detail(settings)["cause"] == "MANIFEST_SIGNATURE_INVALID"


def _shorten_table(settings: Settings) -> None:
    table = bank_a(settings) / "applications.parquet"
    con = duckdb.connect()
    try:
        con.sql(f"COPY (SELECT * FROM read_parquet('{table}') LIMIT 10) TO '{table}.tmp' (FORMAT parquet)")
    finally:
        con.close()
    os.replace(f"{table}.tmp", table)


def test_modified_table_refused(settings: Settings, audit_server: str) -> None:
    _shorten_table(settings)

    error = refusal(audit_server)

    assert "SM3 杂凑值与已签名清单不一致" in error.message
    assert posted_detail(settings)["cause"] == "EXTRACT_TABLE_MODIFIED"


def test_table_check_can_be_switched_off(settings: Settings, audit_server: str) -> None:
    _shorten_table(settings)

    build = asyncio.run(spawner(audit_server, verify_extract_tables=False).check_extract("modeller", "bank_a"))

    assert build == bank_a(settings).name
    assert AuditRecorder.received == []


def test_other_institution_extract_refused(settings: Settings, audit_server: str) -> None:
    (settings.extracts_dir / "bank_b").symlink_to(os.readlink(settings.extracts_dir / "bank_a"))

    with pytest.raises(SpawnException) as raised:
        asyncio.run(spawner(audit_server).check_extract("modeller", "bank_b"))

    assert "数据提取目录属于机构 bank_a，与本沙箱所属机构 bank_b 不一致" in raised.value.message
    ((_authorization, event),) = AuditRecorder.received
    assert event["institution_code"] == "bank_b"
    assert json.loads(event["detail"])["cause"] == "EXTRACT_INSTITUTION_MISMATCH"


def test_no_extract_does_not_block(settings: Settings, audit_server: str) -> None:
    build = asyncio.run(spawner(audit_server).check_extract("modeller", "bank_b"))

    assert build is None
    assert not os.path.lexists(settings.extracts_dir / "bank_b")
    assert AuditRecorder.received == []


def test_dangling_link_refused(settings: Settings, audit_server: str) -> None:
    shutil.rmtree(bank_a(settings))

    error = refusal(audit_server)

    assert "缺失或格式错误" in error.message
    assert posted_detail(settings)["cause"] == "MANIFEST_INVALID"


def test_start_refuses_before_preparing(settings: Settings, audit_server: str) -> None:
    (bank_a(settings) / "manifest.json.sig").unlink()
    sandbox = InstitutionSpawner(user=FakeUser("alice", {"role": "modeller", "institution_code": "bank_a"}),
                                 admin_api_url=audit_server, sandbox_home_root=str(settings.data_dir / "homes"))

    with pytest.raises(SpawnException) as raised:
        asyncio.run(sandbox.start())

    assert raised.value.status_code == 500
    assert posted_detail(settings)["code"] == "EXTRACT_MANIFEST_INVALID"
    assert not (settings.data_dir / "homes").exists()
    assert not (settings.hub_dir / "homes").exists()


def test_hub_fixture_extract_verifies(settings: Settings) -> None:
    write_extract(settings, "hubtest_a")

    assert check_published_extract(settings, "hubtest_a") == "hubtest_a"


def test_docker_hook_refuses_tampered(settings: Settings, audit_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGSANDBOX_UNIX_PREFIX", "rst-")
    config = PyFileConfigLoader("dockerspawner_config.py", path=str(PROJECT_ROOT / "sandbox_images")).load_config()
    (bank_a(settings) / "manifest.json.sig").unlink()

    class DockerLike:
        user = FakeUser("alice", {"role": "modeller", "institution_code": "bank_a"})
        environment: dict = {}
        log = InstitutionSpawner(user=FakeUser("alice", {})).log

    with pytest.raises(SpawnException) as raised:
        asyncio.run(config.DockerSpawner.pre_spawn_hook(DockerLike()))

    assert raised.value.status_code == 500
    assert DockerLike.environment == {}
    assert posted_detail(settings)["cause"] == "MANIFEST_SIGNATURE_INVALID"
