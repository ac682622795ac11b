"""``regsandbox verify`` run as a subprocess against a temporary data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regsandbox_core.crypto import sm3_file
from regsandbox_core.keystore import FileMasterKey, KeyStore
from regsandbox_core.signing import sign_file, sign_object

REGSANDBOX = str(Path(sys.executable).parent / "regsandbox")
MANIFEST = {"institution": "bank_a", "dataset": "applications", "row_count": 1200, "files": ["a.parquet", "b.parquet"]}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    master = FileMasterKey.create(data_dir / "secrets" / "master.key")
    store = KeyStore(data_dir / "keys" / "keystore.json", master)
    store.generate("platform", "signing")

    (tmp_path / "manifest.json").write_text(json.dumps(sign_object(store, "extract_manifest", MANIFEST)))
    extract = tmp_path / "applications.parquet"
    extract.write_bytes(b"PAR1" + os.urandom(4096) + b"PAR1")
    sign_file(store, extract, "extract_file")
    return data_dir


def run_verify(data_dir: Path, *args: str, master_env: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGSANDBOX_")}
    env["REGSANDBOX_DATA_DIR"] = str(data_dir)
    if master_env is not None:
        env["REGSANDBOX_MASTER_KEY"] = master_env
    return subprocess.run([REGSANDBOX, "verify", *args], env=env, capture_output=True, text=True, timeout=60)


def test_valid_envelope_exit_0(data_dir: Path) -> None:
    result = run_verify(data_dir, str(data_dir.parent / "manifest.json"))
    assert result.returncode == 0, result.stderr
    assert "签名有效" in result.stdout
    assert "extract_manifest（数据提取清单）" in result.stdout
    assert "row_count：1200" in result.stdout
    assert "files：列表，2 项" in result.stdout
    assert "platform/signing/v1" in result.stdout
    assert "签名时间" in result.stdout


def test_edited_row_count_exit_1(data_dir: Path) -> None:
    path = data_dir.parent / "manifest.json"
    envelope = json.loads(path.read_text())
    envelope["payload"]["row_count"] = 1300
    path.write_text(json.dumps(envelope))

    result = run_verify(data_dir, str(path))
    assert result.returncode == 1
    assert "验证失败" in result.stderr
    assert "签名与内容不符" in result.stderr
    assert "Traceback" not in result.stderr
    assert "签名有效" not in result.stdout


def test_valid_file_with_sig_exit_0(data_dir: Path) -> None:
    extract = data_dir.parent / "applications.parquet"
    result = run_verify(data_dir, str(extract))
    assert result.returncode == 0, result.stderr
    assert "extract_file（数据提取文件）" in result.stdout
    assert sm3_file(extract) in result.stdout
    assert f"{extract.stat().st_size} 字节" in result.stdout


def test_sig_path_given_verifies_file(data_dir: Path) -> None:
    result = run_verify(data_dir, str(data_dir.parent / "applications.parquet.sig"))
    assert result.returncode == 0, result.stderr
    assert "自签名后未被修改" in result.stdout


def test_modified_file_exit_1(data_dir: Path) -> None:
    extract = data_dir.parent / "applications.parquet"
    content = bytearray(extract.read_bytes())
    content[10] ^= 0xFF
    extract.write_bytes(bytes(content))

    result = run_verify(data_dir, str(extract))
    assert result.returncode == 1
    assert "SM3" in result.stderr
    assert str(extract) in result.stderr


def test_missing_file_exit_2(data_dir: Path) -> None:
    result = run_verify(data_dir, str(data_dir.parent / "nothing.json"))
    assert result.returncode == 2
    assert "不存在" in result.stderr


def test_unsigned_file_exit_2(data_dir: Path) -> None:
    plain = data_dir.parent / "plain.json"
    plain.write_text('{"row_count": 1}')
    result = run_verify(data_dir, str(plain))
    assert result.returncode == 2
    assert "不是签名对象" in result.stderr


def test_no_argument_exit_2(data_dir: Path) -> None:
    result = run_verify(data_dir)
    assert result.returncode == 2


def test_missing_master_key_exit_2(data_dir: Path) -> None:
    (data_dir / "secrets" / "master.key").unlink()
    result = run_verify(data_dir, str(data_dir.parent / "manifest.json"))
    assert result.returncode == 2
    assert "主密钥文件" in result.stderr
    assert "master_key_unavailable" in result.stderr


def test_master_key_from_env(data_dir: Path) -> None:
    master_file = data_dir / "secrets" / "master.key"
    value = master_file.read_text().strip()
    master_file.unlink()
    result = run_verify(data_dir, str(data_dir.parent / "manifest.json"), master_env=value)
    assert result.returncode == 0, result.stderr


def test_world_readable_master_key_exit_2(data_dir: Path) -> None:
    (data_dir / "secrets" / "master.key").chmod(0o644)
    result = run_verify(data_dir, str(data_dir.parent / "manifest.json"))
    assert result.returncode == 2
    assert "chmod 600" in result.stderr


def test_missing_keystore_exit_2(data_dir: Path) -> None:
    (data_dir / "keys" / "keystore.json").unlink()
    result = run_verify(data_dir, str(data_dir.parent / "manifest.json"))
    assert result.returncode == 2
    assert "密钥库" in result.stderr


def test_revoked_key_exit_1(data_dir: Path) -> None:
    store = KeyStore(data_dir / "keys" / "keystore.json", FileMasterKey(data_dir / "secrets" / "master.key"))
    store.rotate("platform", "signing")
    store.revoke("platform", "signing", 1)
    result = run_verify(data_dir, str(data_dir.parent / "manifest.json"))
    assert result.returncode == 1
    assert "已吊销" in result.stderr


def test_renamed_file_shows_signed_name(data_dir: Path) -> None:
    extract = data_dir.parent / "applications.parquet"
    copy = data_dir.parent / "download (1).parquet"
    copy.write_bytes(extract.read_bytes())
    (data_dir.parent / "download (1).parquet.sig").write_bytes((data_dir.parent / "applications.parquet.sig").read_bytes())
    result = run_verify(data_dir, str(copy))
    assert result.returncode == 0, result.stderr
    assert "签名时的文件名：applications.parquet" in result.stdout
