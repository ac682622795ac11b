"""``regsandbox keys`` run as a subprocess against a temporary data directory with a migrated SQLite database."""

from __future__ import annotations

import base64
import json
import os
import pwd
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from regsandbox_core.keystore import FileMasterKey, KeyStore, MasterKeyMismatch
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings
from regsandbox_core.signing import sign_file

VENV_BIN = Path(sys.executable).parent
REGSANDBOX = str(VENV_BIN / "regsandbox")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
OPERATOR = f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGSANDBOX_")}
    env["REGSANDBOX_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def keys(data_dir: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([REGSANDBOX, "keys", *args], env=_environment(data_dir, **extra_env), cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def migrate(data_dir: Path) -> None:
    result = subprocess.run([str(VENV_BIN / "python"), "-m", "admin_api.manage", "migrate"],
                            env=_environment(data_dir), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def audit_events(data_dir: Path) -> list[dict]:
    with sqlite3.connect(data_dir / "admin.db") as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT actor, role, action, resource, outcome, detail FROM audit_events ORDER BY id")
        return [dict(row) for row in rows]


def store_of(data_dir: Path) -> KeyStore:
    return KeyStore(data_dir / "keys" / "keystore.json", FileMasterKey(data_dir / "secrets" / "master.key"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    migrate(data_dir)
    ensure_platform_keys(Settings(data_dir=data_dir), ["bank_a"], on_event=None)
    return data_dir


@pytest.fixture
def backup_key(data_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    result = keys(data_dir, "new-backup-key", "--out", str(path))
    assert result.returncode == 0, result.stderr
    return path


def assert_clean_failure(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()


def test_list_shows_states_without_material(data_dir: Path) -> None:
    store = store_of(data_dir)
    data_key = store.current("bank_a", "data").key

    result = keys(data_dir, "list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["所有者", "类型", "版本", "状态", "创建时间（UTC）"]
    assert any(line.split()[:4] == ["platform", "签名（SM2）", "v1", "启用"] for line in lines)
    assert any(line.split()[:4] == ["bank_a", "令牌化（HMAC-SM3）", "v1", "启用"] for line in lines)
    assert base64.b64encode(data_key).decode() not in result.stdout
    assert data_key.hex() not in result.stdout
    event = audit_events(data_dir)[-1]
    assert (event["actor"], event["role"], event["action"], event["outcome"]) == (OPERATOR, "operator", "key.list", "success")


def test_new_backup_key_private_and_not_overwritten(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "backup.key"

    first = keys(data_dir, "new-backup-key", "--out", str(path))
    content = path.read_bytes()
    second = keys(data_dir, "new-backup-key", "--out", str(path))

    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(content.strip(), validate=True)) == 16
    assert_clean_failure(second)
    assert "已存在，不会覆盖" in second.stderr
    assert path.read_bytes() == content
    actions = [(event["action"], event["outcome"]) for event in audit_events(data_dir)]
    assert actions[-2:] == [("key.new_backup_key", "success"), ("key.new_backup_key", "failed")]


def test_new_backup_key_missing_folder(data_dir: Path, tmp_path: Path) -> None:
    result = keys(data_dir, "new-backup-key", "--out", str(tmp_path / "absent" / "backup.key"))

    assert_clean_failure(result)
    assert "不存在" in result.stderr


def test_backup_restore_round_trip(data_dir: Path, backup_key: Path, tmp_path: Path) -> None:
    store = store_of(data_dir)
    before = store.current("bank_a", "data")
    signing_public = store.current("platform", "signing").public_key
    backup_file = tmp_path / "keys.backup"

    backed_up = keys(data_dir, "backup", "--out", str(backup_file), "--backup-key-file", str(backup_key))
    store.rotate("bank_a", "data")
    refused = keys(data_dir, "restore", "--from", str(backup_file), "--backup-key-file", str(backup_key))
    restored = keys(data_dir, "restore", "--from", str(backup_file), "--backup-key-file", str(backup_key), "--replace")

    assert backed_up.returncode == 0, backed_up.stderr
    assert stat.S_IMODE(backup_file.stat().st_mode) == 0o600
    assert before.key.hex() not in backup_file.read_bytes().hex()
    assert_clean_failure(refused)
    assert "--replace" in refused.stderr
    assert restored.returncode == 0, restored.stderr
    after = store_of(data_dir)
    assert after.current("bank_a", "data").version == 1
    assert after.current("bank_a", "data").key == before.key
    assert after.current("platform", "signing").public_key == signing_public
    assert [entry["version"] for entry in after.metadata()["keys"] if entry["owner"] == "bank_a" and entry["kind"] == "data"] == [1]
    outcomes = [(event["action"], event["outcome"]) for event in audit_events(data_dir)][-3:]
    assert outcomes == [("key.backup", "success"), ("key.restore", "failed"), ("key.restore", "success")]


def test_restore_into_empty_data_dir(data_dir: Path, backup_key: Path, tmp_path: Path) -> None:
    before = store_of(data_dir).current("bank_a", "token").key
    backup_file = tmp_path / "keys.backup"
    assert keys(data_dir, "backup", "--out", str(backup_file), "--backup-key-file", str(backup_key)).returncode == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    migrate(fresh)

    result = keys(fresh, "restore", "--from", str(backup_file), "--backup-key-file", str(backup_key))

    assert result.returncode == 0, result.stderr
    assert "已生成新主密钥文件" in result.stdout
    assert stat.S_IMODE((fresh / "secrets" / "master.key").stat().st_mode) == 0o600
    assert store_of(fresh).current("bank_a", "token").key == before


def test_restore_wrong_backup_key(data_dir: Path, backup_key: Path, tmp_path: Path) -> None:
    backup_file = tmp_path / "keys.backup"
    assert keys(data_dir, "backup", "--out", str(backup_file), "--backup-key-file", str(backup_key)).returncode == 0
    other_key = tmp_path / "other.key"
    assert keys(data_dir, "new-backup-key", "--out", str(other_key)).returncode == 0
    keystore_file = data_dir / "keys" / "keystore.json"
    unchanged = keystore_file.read_bytes()

    result = keys(data_dir, "restore", "--from", str(backup_file), "--backup-key-file", str(other_key), "--replace")

    assert_clean_failure(result)
    assert "完整性校验失败" in result.stderr
    assert "备份密钥" in result.stderr
    assert keystore_file.read_bytes() == unchanged
    event = audit_events(data_dir)[-1]
    assert (event["action"], event["outcome"]) == ("key.restore", "failed")
    assert json.loads(event["detail"])["code"] == "keystore_backup_invalid"


@pytest.mark.parametrize("case", ["missing_key_file", "readable_key_file", "not_base64", "missing_backup"])
def test_bad_input_rejected_without_traceback(data_dir: Path, backup_key: Path, tmp_path: Path, case: str) -> None:
    key_file, source = backup_key, tmp_path / "keys.backup"
    if case != "missing_backup":
        assert keys(data_dir, "backup", "--out", str(source), "--backup-key-file", str(backup_key)).returncode == 0
    if case == "missing_key_file":
        key_file = tmp_path / "absent.key"
    elif case == "readable_key_file":
        os.chmod(backup_key, 0o644)
    elif case == "not_base64":
        backup_key.write_text("不是密钥\n", encoding="utf-8")

    result = keys(data_dir, "restore", "--from", str(source), "--backup-key-file", str(key_file), "--replace")

    assert_clean_failure(result)
    expected = {"missing_key_file": "不存在", "readable_key_file": "chmod 600", "not_base64": "Base64",
                "missing_backup": "备份文件"}[case]
    assert expected in result.stderr
    assert audit_events(data_dir)[-1]["outcome"] == "failed"


def test_backup_does_not_overwrite(data_dir: Path, backup_key: Path, tmp_path: Path) -> None:
    existing = tmp_path / "keys.backup"
    existing.write_bytes(b"older backup")

    result = keys(data_dir, "backup", "--out", str(existing), "--backup-key-file", str(backup_key))

    assert_clean_failure(result)
    assert "不会覆盖" in result.stderr
    assert existing.read_bytes() == b"older backup"


def test_rotate_master_new_master_only(data_dir: Path, tmp_path: Path) -> None:
    master_file = data_dir / "secrets" / "master.key"
    old_master_copy = tmp_path / "old-master.key"
    old_master_copy.write_bytes(master_file.read_bytes())
    os.chmod(old_master_copy, 0o600)
    before = store_of(data_dir).current("bank_a", "data").key
    signing_public = store_of(data_dir).current("platform", "signing").public_key

    result = keys(data_dir, "rotate-master")

    assert result.returncode == 0, result.stderr
    assert "主密钥已轮换" in result.stdout
    assert master_file.read_bytes() != old_master_copy.read_bytes()
    assert stat.S_IMODE(master_file.stat().st_mode) == 0o600
    assert not (data_dir / "secrets" / "master.key.new").exists()
    rotated = KeyStore(data_dir / "keys" / "keystore.json", FileMasterKey(master_file))
    assert rotated.current("bank_a", "data").key == before
    assert rotated.current("platform", "signing").public_key == signing_public
    with pytest.raises(MasterKeyMismatch):
        KeyStore(data_dir / "keys" / "keystore.json", FileMasterKey(old_master_copy)).current("bank_a", "data")
    event = audit_events(data_dir)[-1]
    assert (event["action"], event["outcome"]) == ("key.rotate_master", "success")
    detail = json.loads(event["detail"])
    assert detail["new_master_key_id"] == rotated.master.key_id
    assert detail["old_master_key_id"] != detail["new_master_key_id"]


def test_rotate_master_removes_unused_leftover(data_dir: Path) -> None:
    leftover = data_dir / "secrets" / "master.key.new"
    FileMasterKey.create(leftover)

    result = keys(data_dir, "rotate-master")

    assert result.returncode == 0, result.stderr
    assert not leftover.exists()
    assert store_of(data_dir).current("bank_a", "data").version == 1


def test_rotate_master_from_environment_refused(data_dir: Path) -> None:
    master_file = data_dir / "secrets" / "master.key"
    env_value = master_file.read_text().strip()
    keystore_file = data_dir / "keys" / "keystore.json"
    unchanged = keystore_file.read_bytes()

    result = keys(data_dir, "rotate-master", REGSANDBOX_MASTER_KEY=env_value)

    assert_clean_failure(result)
    assert "REGSANDBOX_MASTER_KEY" in result.stderr
    assert "KMS" in result.stderr
    assert keystore_file.read_bytes() == unchanged
    event = audit_events(data_dir)[-1]
    assert (event["action"], event["outcome"]) == ("key.rotate_master", "failed")


def test_unmigrated_database_refuses_command(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    out = tmp_path / "backup.key"

    result = keys(data_dir, "new-backup-key", "--out", str(out))

    assert_clean_failure(result)
    assert "审计日志" in result.stderr
    assert not out.exists()
    assert not (data_dir / "admin.db").exists()


def test_verify_writes_audit_event(data_dir: Path, tmp_path: Path) -> None:
    document = tmp_path / "report.txt"
    document.write_text("季度报告", encoding="utf-8")
    sign_file(store_of(data_dir), document, "report_file")
    environment = _environment(data_dir)

    valid = subprocess.run([REGSANDBOX, "verify", str(document)], env=environment, cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=120)
    document.write_text("季度报告（已改）", encoding="utf-8")
    invalid = subprocess.run([REGSANDBOX, "verify", str(document)], env=environment, cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=120)

    assert valid.returncode == 0, valid.stderr
    assert invalid.returncode == 1, invalid.stdout
    events = [event for event in audit_events(data_dir) if event["action"] == "signature.verify"]
    assert [event["outcome"] for event in events] == ["success", "failed"]
    assert events[0]["actor"] == OPERATOR
    assert events[0]["resource"] == f"file:{document.resolve()}"
    assert json.loads(events[1]["detail"]) == {"code": "signature_invalid"}


def test_verify_without_database_still_verifies(tmp_path: Path) -> None:
    data_dir = tmp_path / "bare"
    ensure_platform_keys(Settings(data_dir=data_dir), [], on_event=None)
    document = tmp_path / "report.txt"
    document.write_text("季度报告", encoding="utf-8")
    sign_file(store_of(data_dir), document, "report_file")

    result = subprocess.run([REGSANDBOX, "verify", str(document)], env=_environment(data_dir), cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "未能写入审计日志" in result.stderr
    assert "Traceback" not in result.stderr
