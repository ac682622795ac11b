"""The SM3 chain of audit events: computed on every insert, kept by concurrent writers, verified by id."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from admin_api.audit import record_operator_event
from admin_api.audit_archive import check_archive
from admin_api.audit_chain import GENESIS_SM3, chain_digest, verify_chain
from admin_api.audit_checkpoint import CheckpointWriter, checkpoint_files, verify_checkpoints, write_checkpoint
from admin_api.db import make_engine, make_session_factory, utc_now
from admin_api.migrate import alembic_config, upgrade_to_head
from admin_api.models import AuditChainHead, AuditEvent
from launcher import cli
from regsandbox_core import settings as settings_module
from regsandbox_core.keystore import KeyStore, master_key_from_environment
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import ensure_platform_secrets
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, verify_file

from .conftest import BACKENDS, Env
from .helpers import audit_events

WRITER_THREADS = 6
EVENTS_PER_WRITER = 8


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory of a fresh migrated database that a test may break on purpose."""
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def _append(sessions: sessionmaker[Session], count: int, actor: str = "cli:rst-tester") -> None:
    for number in range(count):
        record_operator_event(sessions, actor, "test.append", f"item:{number}", "success", {"n": number})


def _rows(sessions: sessionmaker[Session]) -> list[AuditEvent]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def _assert_linked(rows: list[AuditEvent]) -> None:
    prev = GENESIS_SM3
    for row in rows:
        assert row.prev_sm3 == prev, f"event {row.id} is not linked to the previous event"
        assert row.chain_sm3 == chain_digest(prev, row), f"event {row.id} has a wrong digest"
        prev = row.chain_sm3


def _tamper(sessions: sessionmaker[Session], statement: str) -> None:
    """Run ``statement`` with the append-only triggers switched off, then switch them on again."""
    engine = sessions.kw["bind"]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update"))
            connection.execute(text(statement))
            connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update"))
        else:
            connection.execute(text("DROP TRIGGER audit_events_no_update"))
            connection.execute(text("DROP TRIGGER audit_events_no_delete"))
            connection.execute(text(statement))
            for name in ("UPDATE", "DELETE"):
                connection.execute(text(
                    f"CREATE TRIGGER audit_events_no_{name.lower()} BEFORE {name} ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
                ))


# --- computing the chain ---------------------------------------------------------------------------


def test_chain_every_insert_path(env: Env) -> None:
    appended = env.client.post("/api/v1/audit/events", headers={**env.service("hub"), "X-Request-ID": "chain-append"},
                               json={"actor": "modeller_a", "action": "hub.spawn", "resource": "server:modeller_a",
                                     "outcome": "success", "detail": "界面启动"})
    assert appended.status_code == 201, appended.text
    denied = env.client.get("/api/v1/audit/events", headers={**env.auth("modeller_a"), "X-Request-ID": "chain-deny"})
    assert denied.status_code == 403
    record_operator_event(env.session_factory, "cli:rst-chain", "test.operator", "chain:1", "success")

    body = appended.json()
    assert len(body["chain_sm3"]) == 64
    assert len(audit_events(env, "chain-deny")) == 1
    with env.db() as session:
        rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        head = session.get(AuditChainHead, 1)
    _assert_linked(rows)
    assert head is not None
    assert (head.last_id, head.last_sm3) == (rows[-1].id, rows[-1].chain_sm3)
    assert [row.id for row in rows] == list(range(1, len(rows) + 1))
    with env.db() as session:
        assert verify_chain(session).intact


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_chain_triggers_still_block(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 2)
    with sessions() as session:
        with pytest.raises(DBAPIError, match="append-only"):
            session.execute(text("UPDATE audit_events SET actor = 'x' WHERE id = 1"))
        session.rollback()
        with pytest.raises(DBAPIError, match="append-only"):
            session.execute(text("DELETE FROM audit_events WHERE id = 2"))


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_concurrent_writers_one_chain(sessions: sessionmaker[Session]) -> None:
    start = threading.Barrier(WRITER_THREADS, timeout=30)
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            start.wait()
            _append(sessions, EVENTS_PER_WRITER, actor=f"cli:rst-writer{number}")
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(WRITER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    rows = _rows(sessions)
    assert len(rows) == WRITER_THREADS * EVENTS_PER_WRITER
    assert [row.id for row in rows] == list(range(1, len(rows) + 1))
    assert len({row.prev_sm3 for row in rows}) == len(rows), "two events share a predecessor: the chain forked"
    _assert_linked(rows)
    with sessions() as session:
        assert verify_chain(session).intact


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_chain_rollback_leaves_no_gap(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 1)
    with sessions() as session:
        session.add(AuditEvent(actor="cli:rst-tester", action="test.rollback", resource="r", outcome="success"))
        session.flush()
        session.rollback()
    _append(sessions, 1)
    rows = _rows(sessions)
    assert [row.id for row in rows] == [1, 2]
    _assert_linked(rows)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_migration_chains_existing_rows(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0002")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for number in range(3):
                connection.execute(text(
                    "INSERT INTO audit_events (occurred_at, actor, action, resource, outcome, detail) "
                    "VALUES (CURRENT_TIMESTAMP, 'sysadmin', 'test.old', :resource, 'success', '旧事件')"
                ), {"resource": f"old:{number}"})
        upgrade_to_head(database_url)
        sessions = make_session_factory(engine)
        _append(sessions, 1)
        rows = _rows(sessions)
        assert [row.resource for row in rows] == ["old:0", "old:1", "old:2", "item:0"]
        _assert_linked(rows)
        with sessions() as session:
            assert verify_chain(session).intact
    finally:
        engine.dispose()


# --- verification ----------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_verify_detects_edit(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 5)
    _tamper(sessions, "UPDATE audit_events SET detail = '{\"n\": 99}' WHERE id = 3")
    with sessions() as session:
        result = verify_chain(session)
    assert not result.intact
    assert result.broken_id == 3
    assert result.code == "audit_chain_row_modified"
    assert "编号 3 的事件内容与其 SM3 摘要不符" in result.message
    assert result.rows == 2


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_verify_detects_deleted_row(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 5)
    _tamper(sessions, "DELETE FROM audit_events WHERE id = 3")
    with sessions() as session:
        result = verify_chain(session)
    assert not result.intact
    assert result.broken_id == 3
    assert result.code == "audit_chain_row_missing"
    assert "编号 3 的审计事件缺失" in result.message


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_verify_detects_deleted_newest(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 5)
    _tamper(sessions, "DELETE FROM audit_events WHERE id >= 4")
    with sessions() as session:
        result = verify_chain(session)
    assert not result.intact
    assert result.broken_id == 4
    assert result.code == "audit_chain_row_missing"
    assert "编号 4 至 5 的审计事件缺失" in result.message


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_verify_detects_digest_rewrite(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 3)
    _tamper(sessions, f"UPDATE audit_events SET prev_sm3 = '{'1' * 64}' WHERE id = 2")
    with sessions() as session:
        result = verify_chain(session)
    assert result.broken_id == 2
    assert result.code == "audit_chain_link_broken"


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_verify_pages_large_log(sessions: sessionmaker[Session]) -> None:
    _append(sessions, 7)
    with sessions() as session:
        result = verify_chain(session, batch_rows=2)
    assert result.intact
    assert result.rows == 7
    assert result.last_id == 7


# --- regsandbox audit verify -----------------------------------------------------------------------


def _run_cli(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path, *arguments: str) -> int:
    monkeypatch.setenv("REGSANDBOX_DATABASE_URL", database_url)
    monkeypatch.setenv("REGSANDBOX_DATA_DIR", str(tmp_path / "data"))
    settings_module.get_settings.cache_clear()
    try:
        return cli.main(["audit", *(arguments or ("verify",))])
    finally:
        settings_module.get_settings.cache_clear()


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_cli_verify_intact_then_broken(sessions: sessionmaker[Session], database_url: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _append(sessions, 4)

    assert _run_cli(monkeypatch, database_url, tmp_path) == 0
    output = capsys.readouterr()
    assert "审计日志链完整：共 4 条事件" in output.out

    _tamper(sessions, "UPDATE audit_events SET actor = 'cli:someone-else' WHERE id = 2")
    assert _run_cli(monkeypatch, database_url, tmp_path) == 1
    output = capsys.readouterr()
    assert "编号 2 的事件内容与其 SM3 摘要不符" in output.err
    assert "audit_chain_row_modified" in output.err

    verifications = [row for row in _rows(sessions) if row.action == "audit.verify"]
    assert [row.outcome for row in verifications] == ["success", "failed"]
    assert verifications[0].role == "operator"
    assert verifications[0].actor.startswith("cli:")
    assert '"broken_id": 2' in (verifications[1].detail or "")


def test_cli_verify_missing_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'absent.db'}"
    assert _run_cli(monkeypatch, url, tmp_path) == 2
    assert "不存在，无法校验审计日志" in capsys.readouterr().err


# --- regsandbox audit archive ----------------------------------------------------------------------


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_cli_archive_signed_copy(sessions: sessionmaker[Session], database_url: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, database_url=database_url)
    ensure_platform_secrets(settings)
    ensure_platform_keys(settings, [], on_event=None)
    old = utc_now() - timedelta(days=200)
    with sessions() as session:
        for number in range(3):
            session.add(AuditEvent(occurred_at=old + timedelta(seconds=number), actor="cli:rst-old",
                                   action="test.old", resource=f"old:{number}", outcome="success"))
        session.commit()
    _append(sessions, 2)
    out = tmp_path / "archive.jsonl"

    assert _run_cli(monkeypatch, database_url, tmp_path, "archive", "--out", str(out)) == 0
    assert "已归档 3 条" in capsys.readouterr().out

    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["retention_days"] == 180
    assert [json.loads(line)["id"] for line in lines[1:]] == [1, 2, 3]
    assert check_archive(out) == 3
    keystore = KeyStore(data_dir / "keys" / "keystore.json", master_key_from_environment(data_dir))
    assert verify_file(out, keystore).name == out.name
    assert _run_cli(monkeypatch, database_url, tmp_path, "verify") == 0
    archived = [row for row in _rows(sessions) if row.action == "audit.archive"]
    assert [(row.outcome, json.loads(row.detail or "{}")["rows"]) for row in archived] == [("success", 3)]

    out.write_text(out.read_text(encoding="utf-8").replace("old:1", "old:9"), encoding="utf-8")
    with pytest.raises(ValueError, match="归档中编号 2 的事件内容与其 SM3 摘要不符"):
        check_archive(out)
    with pytest.raises(SignatureInvalid):
        verify_file(out, keystore)
    assert _run_cli(monkeypatch, database_url, tmp_path, "archive", "--out", str(out)) == 1
    assert "已存在，未覆盖" in capsys.readouterr().err


# --- signed checkpoints of the chain head ----------------------------------------------------------


def _rewrite_chain(sessions: sessionmaker[Session], statement: str) -> None:
    """Run ``statement`` and then recompute every digest and the head, as an attacker with database access could."""
    _tamper(sessions, statement)
    prev = GENESIS_SM3
    updates = []
    for row in _rows(sessions):
        digest = chain_digest(prev, row)
        updates.append(f"UPDATE audit_events SET prev_sm3 = '{prev}', chain_sm3 = '{digest}' WHERE id = {row.id}")
        prev = digest
    last_id = max(row.id for row in _rows(sessions))
    for update in updates:
        _tamper(sessions, update)
    with sessions() as session:
        session.execute(text(f"UPDATE audit_chain_head SET last_id = {last_id}, last_sm3 = '{prev}' WHERE id = 1"))
        session.commit()


def _checkpoint_settings(database_url: str, tmp_path: Path) -> tuple[Settings, KeyStore]:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, database_url=database_url)
    ensure_platform_secrets(settings)
    ensure_platform_keys(settings, [], on_event=None)
    return settings, KeyStore(data_dir / "keys" / "keystore.json", master_key_from_environment(data_dir))


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_checkpoint_detects_recomputed_chain(sessions: sessionmaker[Session], database_url: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    settings, _keystore = _checkpoint_settings(database_url, tmp_path)
    _append(sessions, 4)
    assert _run_cli(monkeypatch, database_url, tmp_path, "checkpoint") == 0
    assert "已生成审计检查点" in capsys.readouterr().out
    assert [path.name for path in checkpoint_files(settings)] == ["000000000004.json"]
    assert _run_cli(monkeypatch, database_url, tmp_path, "verify") == 0
    assert "已核对 1 个已签名的审计检查点" in capsys.readouterr().out

    _rewrite_chain(sessions, "UPDATE audit_events SET actor = 'cli:rewritten' WHERE id = 2")
    with sessions() as session:
        assert verify_chain(session).intact  # the chain alone cannot see a full recomputation

    assert _run_cli(monkeypatch, database_url, tmp_path, "verify") == 1
    error = capsys.readouterr().err
    assert "audit_checkpoint_mismatch" in error
    assert "编号 4 的审计事件摘要与已签名的审计检查点" in error


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_checkpoint_detects_truncation(sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    settings, keystore = _checkpoint_settings(database_url, tmp_path)
    _append(sessions, 5)
    with sessions() as session:
        assert write_checkpoint(session, settings, keystore) is not None
        assert write_checkpoint(session, settings, keystore) is None  # head unchanged

    _rewrite_chain(sessions, "DELETE FROM audit_events WHERE id >= 4")

    with sessions() as session:
        assert verify_chain(session).intact
        result = verify_checkpoints(session, settings, keystore)
    assert not result.intact
    assert result.code == "audit_checkpoint_row_missing"
    assert "编号 5 的审计事件已不存在" in result.message


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_checkpoint_edited_file_rejected(sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    settings, keystore = _checkpoint_settings(database_url, tmp_path)
    _append(sessions, 2)
    with sessions() as session:
        path = write_checkpoint(session, settings, keystore)
    assert path is not None
    assert path.stat().st_mode & 0o777 == 0o600
    envelope = json.loads(path.read_text(encoding="utf-8"))
    envelope["payload"]["last_id"] = 1
    path.write_text(json.dumps(envelope), encoding="utf-8")

    with sessions() as session:
        result = verify_checkpoints(session, settings, keystore)

    assert result.code == "audit_checkpoint_signature_invalid"
    assert path.name in result.message


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_checkpoint_writer_runs_periodically(sessions: sessionmaker[Session], database_url: str,
                                             tmp_path: Path) -> None:
    settings, keystore = _checkpoint_settings(database_url, tmp_path)
    _append(sessions, 1)
    writer = CheckpointWriter(sessions, settings, keystore, interval=0.1)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while not checkpoint_files(settings) and time.monotonic() < deadline:
            time.sleep(0.05)
        _append(sessions, 1)
        while len(checkpoint_files(settings)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        writer.stop()

    assert [path.name for path in checkpoint_files(settings)] == ["000000000001.json", "000000000002.json"]
