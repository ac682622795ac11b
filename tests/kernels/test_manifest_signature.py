"""The helper verifies the SM2 signature of the extract manifest before it opens a connection."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest

import regsandbox_kernel as rs
from regsandbox_core.settings import Settings
from regsandbox_core.sm import generate_sm2_keypair


@pytest.fixture
def copied_extract(kernel_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of bank_a's published build and the trusted keys file, laid out like ``extracts/``."""
    root = tmp_path / "extracts"
    root.mkdir()
    folder = root / "bank_a"
    shutil.copytree(os.path.realpath(kernel_settings.extracts_dir / "bank_a"), folder)
    shutil.copy(kernel_settings.extracts_dir / "platform_signing_keys.json", root / "platform_signing_keys.json")
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(folder))
    monkeypatch.setenv("REGSANDBOX_INSTITUTION", "bank_a")
    monkeypatch.delenv("REGSANDBOX_TRUSTED_KEYS", raising=False)
    return folder


def _open_fails(code: str) -> rs.ExtractNotConfiguredError:
    connections_before = rs.extract._default_connection
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.connect()
    assert caught.value.code == code
    assert rs.extract._default_connection is connections_before
    return caught.value


def test_copy_with_signature_opens(copied_extract: Path) -> None:
    con = rs.connect()
    try:
        assert con.sql("SELECT count(*) FROM applications").fetchall() == [(334,)]
    finally:
        con.close()
    rs.verify_tables()


def test_edited_manifest_rejected(copied_extract: Path) -> None:
    path = copied_extract / "manifest.json"
    document = json.loads(path.read_text("utf-8"))
    document["tables"][0]["row_count"] += 1
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    error = _open_fails("MANIFEST_SIGNATURE_INVALID")
    assert "签名验证失败" in error.message
    assert str(path) in error.message


def test_missing_signature_rejected(copied_extract: Path) -> None:
    (copied_extract / "manifest.json.sig").unlink()
    error = _open_fails("MANIFEST_SIGNATURE_INVALID")
    assert "manifest.json.sig" in error.message


def test_untrusted_signing_key_rejected(copied_extract: Path) -> None:
    public = generate_sm2_keypair().public_key
    keys = copied_extract.parent / "platform_signing_keys.json"
    keys.write_text(json.dumps({"format": "regsandbox-trusted-keys/1", "keys": {"platform/signing/v1": public.hex()}}))
    os.chmod(keys, 0o644)
    _open_fails("MANIFEST_SIGNATURE_INVALID")


def test_missing_trusted_keys_rejected(copied_extract: Path) -> None:
    (copied_extract.parent / "platform_signing_keys.json").unlink()
    error = _open_fails("TRUSTED_KEYS_MISSING")
    assert "platform_signing_keys.json" in error.message


def test_group_writable_trusted_keys_rejected(copied_extract: Path) -> None:
    os.chmod(copied_extract.parent / "platform_signing_keys.json", 0o664)
    _open_fails("TRUSTED_KEYS_UNSAFE")


def test_trusted_keys_variable_used(copied_extract: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved = tmp_path / "keys.json"
    shutil.move(copied_extract.parent / "platform_signing_keys.json", moved)
    monkeypatch.setenv("REGSANDBOX_TRUSTED_KEYS", str(moved))
    con = rs.connect()
    con.close()


def test_modified_table_detected(copied_extract: Path) -> None:
    table = copied_extract / "applications.parquet"
    con = duckdb.connect()
    con.sql(f"COPY (SELECT * FROM read_parquet('{table}') LIMIT 10) TO '{table}.tmp' (FORMAT parquet)")
    con.close()
    os.replace(f"{table}.tmp", table)
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.verify_tables()
    assert caught.value.code == "EXTRACT_TABLE_MODIFIED"
