"""Extracts under the key store: token key versions, the signed manifest, rotation and migration."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from extracts.builder import ExtractKeyMissingError, build_extract, extract_dir
from extracts.demo_data import DEMO_INSTITUTIONS
from extracts.warehouse import read_partition
from regsandbox_core.crypto import keyed_token
from regsandbox_core.platform_keys import KeyStoreMissing, ensure_platform_keys, ensure_tokenisation_key, open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, verify_file
from tests.extract_setup import approve_shipped_policy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGSANDBOX = str(Path(sys.executable).parent / "regsandbox")
TOKEN_COLUMNS = ("id_number",)


def _tokens(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "applications.parquet").select("application_id", *TOKEN_COLUMNS).sort("application_id")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _expected_tokens(settings: Settings, code: str, key: bytes) -> pl.DataFrame:
    raw = read_partition(settings, open_keystore(settings), code)
    return pl.DataFrame({
        "application_id": raw["application_id"],
        "id_number": [keyed_token(key, value) for value in raw["id_number"].to_list()],
    }).sort("application_id")


def _edit_row_count(manifest_path: Path) -> None:
    document = json.loads(manifest_path.read_text(encoding="utf-8"))
    document["tables"][0]["row_count"] += 1
    manifest_path.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _run_verify(settings: Settings, target: Path) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("REGSANDBOX_")}
    environment["REGSANDBOX_DATA_DIR"] = str(settings.data_dir)
    return subprocess.run([REGSANDBOX, "verify", str(target)], env=environment, capture_output=True, text=True,
                          timeout=60)


def test_manifest_signature_verifies(demo_settings: Settings) -> None:
    store = open_keystore(demo_settings)
    for code in DEMO_INSTITUTIONS:
        manifest_path = extract_dir(demo_settings, code) / "manifest.json"
        result = verify_file(manifest_path, store)
        assert (result.kind, result.key, result.name) == ("extract_manifest", "platform/signing/v1", "manifest.json")
        assert result.size == manifest_path.stat().st_size


def test_edited_row_count_fails_verification(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_a")
    _edit_row_count(folder / "manifest.json")
    with pytest.raises(SignatureInvalid) as caught:
        verify_file(folder / "manifest.json", open_keystore(fresh_settings))
    assert caught.value.code == "signature_invalid"
    assert "签名后被修改" in caught.value.message


def test_rotation_changes_tokens_and_manifest_version(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_a")
    before = _tokens(folder)
    store = open_keystore(fresh_settings)

    assert store.rotate("bank_a", "token") == 2
    build_extract(fresh_settings, "bank_a")
    after = _tokens(folder)
    manifest = _manifest(folder)

    assert manifest["token_key_version"] == 2
    assert manifest["token_key"] == "bank_a/token/v2"
    assert after["application_id"].equals(before["application_id"])
    for column in TOKEN_COLUMNS:
        assert not set(after[column].to_list()) & set(before[column].to_list()), column
    assert after.equals(_expected_tokens(fresh_settings, "bank_a", store.current("bank_a", "token").key))
    assert verify_file(folder / "manifest.json", store).kind == "extract_manifest"


def test_migration_keeps_tokens_of_plain_key(bare_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    plain_key = ensure_tokenisation_key(bare_settings, "bank_a")
    caplog.set_level(logging.INFO, logger="regsandbox_core.platform_keys")

    store = ensure_platform_keys(bare_settings, list(DEMO_INSTITUTIONS))
    approve_shipped_policy(bare_settings)
    folder = build_extract(bare_settings, "bank_a")

    assert _tokens(folder).equals(_expected_tokens(bare_settings, "bank_a", plain_key))
    assert _manifest(folder)["token_key_version"] == 1
    assert store.current("bank_a", "token").key == plain_key
    assert store.current("bank_b", "token").key != plain_key
    logged = caplog.text
    assert "key store import bank_a/token/v1 success" in logged
    assert "key store generate platform/signing/v1 success" in logged
    assert plain_key.hex() not in logged


def test_init_keys_idempotent(fresh_settings: Settings) -> None:
    store = open_keystore(fresh_settings)
    before = store.metadata()["keys"]
    ensure_platform_keys(fresh_settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(fresh_settings)
    assert store.metadata()["keys"] == before
    assert sorted((entry["owner"], entry["kind"], entry["version"]) for entry in before) == [
        ("bank_a", "data", 1), ("bank_a", "token", 1), ("bank_b", "data", 1), ("bank_b", "token", 1),
        ("bank_c", "data", 1), ("bank_c", "token", 1), ("platform", "data", 1), ("platform", "signing", 1),
        ("platform", "token", 1),
    ]


def test_master_key_from_environment_no_file(bare_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGSANDBOX_MASTER_KEY", "MDEyMzQ1Njc4OWFiY2RlZg==")
    ensure_platform_keys(bare_settings, ["bank_a"], on_event=None)
    approve_shipped_policy(bare_settings)
    assert not (bare_settings.secrets_dir / "master.key").exists()
    assert build_extract(bare_settings, "bank_a").is_dir()


def test_missing_keystore_asks_for_init(bare_settings: Settings) -> None:
    with pytest.raises(KeyStoreMissing) as caught:
        build_extract(bare_settings, "bank_a")
    assert caught.value.code == "keystore_missing"
    assert "regsandbox init" in caught.value.message
    assert not extract_dir(bare_settings, "bank_a").exists()
    assert not (bare_settings.keys_dir / "tokenisation").exists()


def test_revoked_token_key_refused(fresh_settings: Settings) -> None:
    store = open_keystore(fresh_settings)
    store.revoke("bank_b", "token", 1, reason="test")
    with pytest.raises(ExtractKeyMissingError) as caught:
        build_extract(fresh_settings, "bank_b")
    assert caught.value.code == "EXTRACT_KEY_MISSING"
    assert "bank_b/token" in caught.value.message
    assert not extract_dir(fresh_settings, "bank_b").exists()


def test_signature_file_private_without_group(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_c")
    assert oct((folder / "manifest.json.sig").stat().st_mode & 0o777) == oct(0o600)


def test_cli_verify_manifest(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_a")
    manifest_path = folder / "manifest.json"

    valid = _run_verify(fresh_settings, manifest_path)
    assert valid.returncode == 0, valid.stderr
    assert "签名有效" in valid.stdout
    assert "签名类型：extract_manifest（数据提取清单）" in valid.stdout
    assert "签名密钥：platform/signing/v1（SM2-SM3）" in valid.stdout
    assert "签名时间：" in valid.stdout

    _edit_row_count(manifest_path)
    edited = _run_verify(fresh_settings, manifest_path)
    assert edited.returncode == 1
    assert "签名验证失败" in edited.stderr
    assert "Traceback" not in edited.stderr


def test_extracts_cli_without_keystore_exit_one(bare_settings: Settings) -> None:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(bare_settings.data_dir)}
    environment.pop("REGSANDBOX_MASTER_KEY", None)
    result = subprocess.run([sys.executable, "-m", "extracts", "build", "--institution", "bank_a"], cwd=PROJECT_ROOT,
                            env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "keystore_missing" in result.stderr
    assert "regsandbox init" in result.stderr
    assert "Traceback" not in result.stderr
