"""The warehouse encrypted at rest: no plaintext on disk, builds from ciphertext, key and tamper errors, migration."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from extracts.builder import build_extract, extract_dir
from extracts.demo_data import DEMO_INSTITUTIONS
from tests.extracts.conftest import masked_demo, watermarked
from extracts.warehouse import (
    WarehouseMigrationMismatch,
    WarehousePartitionInvalid,
    WarehousePartitionUnreadable,
    migrate_plaintext_partition,
    partition_associated_data,
    partition_key_label,
    plaintext_partition_file,
    read_partition,
    read_partition_bytes,
    warehouse_institutions,
    warehouse_partition_file,
    write_partition,
)
from regsandbox_core.documents import encrypt_document
from regsandbox_core.keystore import KeyDestroyed, KeyRevoked
from regsandbox_core.platform_keys import ensure_platform_keys, open_keystore
from regsandbox_core.settings import Settings
from tests.extract_setup import approve_shipped_policy

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _run_build(settings: Settings, code: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(settings.data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "extracts", "build", "--institution", code],
        cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )


def _plain_frame(demo_parquet: dict[str, bytes], code: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(demo_parquet[code]))


@pytest.mark.parametrize("code", DEMO_INSTITUTIONS)
def test_partition_on_disk_not_plaintext(demo_settings: Settings, demo_parquet: dict[str, bytes], code: str) -> None:
    ciphertext = warehouse_partition_file(demo_settings, code).read_bytes()
    raw = _plain_frame(demo_parquet, code)

    assert ciphertext.startswith(b"RSSG")
    assert not ciphertext.startswith(b"PAR1")
    assert not ciphertext.endswith(b"PAR1")
    assert b"application_id" not in ciphertext
    for id_number in raw["id_number"].to_list():
        assert id_number.encode("ascii") not in ciphertext, id_number
    for name in raw["name"].to_list():
        assert name.encode("utf-8") not in ciphertext, name
    assert not list(demo_settings.warehouse_dir.rglob("*.parquet"))


def test_builder_round_trip_from_ciphertext(fresh_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    store = open_keystore(fresh_settings)
    raw = _plain_frame(demo_parquet, "bank_c")

    folder = build_extract(fresh_settings, "bank_c")

    assert read_partition_bytes(fresh_settings, store, "bank_c") == demo_parquet["bank_c"]
    assert read_partition(fresh_settings, store, "bank_c").equals(raw)
    expected = watermarked(masked_demo(raw, store.current("bank_c", "token").key), fresh_settings, folder)
    assert pl.read_parquet(folder / "applications.parquet").sort("application_id").equals(expected.sort("application_id"))


def test_write_partition_under_rotated_key(fresh_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    store = open_keystore(fresh_settings)
    raw = _plain_frame(demo_parquet, "bank_a")

    assert store.rotate("bank_a", "data") == 2
    assert read_partition(fresh_settings, store, "bank_a").equals(raw)  # v1 is decrypt_only now
    write_partition(fresh_settings, store, "bank_a", raw)

    header = warehouse_partition_file(fresh_settings, "bank_a").read_bytes()[:80]
    assert b"bank_a/data/v2" in header
    assert build_extract(fresh_settings, "bank_a").is_dir()


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


@pytest.mark.parametrize(
    ("damage", "error_code", "phrase"),
    [
        (_flip_middle_byte, "ciphertext_tampered", "完整性校验失败"),
        (_truncate, "ciphertext_truncated", "密文不完整"),
    ],
)
def test_damaged_partition_keeps_extract(fresh_settings: Settings, damage, error_code: str, phrase: str) -> None:
    folder = build_extract(fresh_settings, "bank_a")
    before = _snapshot(folder)
    partition = warehouse_partition_file(fresh_settings, "bank_a")
    damage(partition)

    with pytest.raises(WarehousePartitionUnreadable) as caught:
        build_extract(fresh_settings, "bank_a")

    assert caught.value.code == error_code
    assert phrase in caught.value.message
    assert str(partition) in caught.value.message
    assert _snapshot(folder) == before
    assert build_extract(fresh_settings, "bank_b").is_dir()


def test_damaged_partition_cli_exit_one(fresh_settings: Settings) -> None:
    _flip_middle_byte(warehouse_partition_file(fresh_settings, "bank_b"))

    result = _run_build(fresh_settings, "bank_b")

    assert result.returncode == 1
    assert "错误 [ciphertext_tampered]" in result.stderr
    assert "机构 bank_b 的数据仓库分区" in result.stderr
    assert "Traceback" not in result.stderr
    assert not extract_dir(fresh_settings, "bank_b").exists()


def test_build_reencrypts_after_rotation(fresh_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    store = open_keystore(fresh_settings)
    build_extract(fresh_settings, "bank_b")
    assert partition_key_label(fresh_settings, "bank_b") == "bank_b/data/v1"

    store.rotate("bank_b", "data")
    build_extract(fresh_settings, "bank_b")
    store.revoke("bank_b", "data", 1, reason="轮换后停用")
    store.destroy("bank_b", "data", 1)

    assert partition_key_label(fresh_settings, "bank_b") == "bank_b/data/v2"
    assert read_partition(fresh_settings, store, "bank_b").equals(_plain_frame(demo_parquet, "bank_b"))
    assert build_extract(fresh_settings, "bank_b").is_dir()


def test_destroyed_data_key_fails_build(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_a")
    before = _snapshot(folder)
    store = open_keystore(fresh_settings)
    store.rotate("bank_a", "data")
    store.destroy("bank_a", "data", 1)

    with pytest.raises(WarehousePartitionUnreadable) as caught:
        build_extract(fresh_settings, "bank_a")

    assert caught.value.code == "key_destroyed"
    assert isinstance(caught.value.__cause__, KeyDestroyed)
    assert KeyDestroyed("bank_a", "data", 1).message in caught.value.message
    assert _snapshot(folder) == before
    assert build_extract(fresh_settings, "bank_b").is_dir()


def test_revoked_data_key_fails_build(fresh_settings: Settings) -> None:
    store = open_keystore(fresh_settings)
    store.revoke("bank_c", "data", 1, reason="test")

    with pytest.raises(WarehousePartitionUnreadable) as caught:
        build_extract(fresh_settings, "bank_c")

    assert caught.value.code == "key_revoked"
    assert isinstance(caught.value.__cause__, KeyRevoked)
    assert KeyRevoked("bank_c", "data", 1).message in caught.value.message
    assert not extract_dir(fresh_settings, "bank_c").exists()


def test_partition_of_other_key_store_rejected(fresh_settings: Settings, demo_settings: Settings) -> None:
    shutil.copyfile(warehouse_partition_file(demo_settings, "bank_a"), warehouse_partition_file(fresh_settings, "bank_a"))

    with pytest.raises(WarehousePartitionUnreadable) as caught:
        build_extract(fresh_settings, "bank_a")

    assert caught.value.code == "stream_wrong_key"
    assert not extract_dir(fresh_settings, "bank_a").exists()


def test_partition_of_other_institution_rejected(fresh_settings: Settings) -> None:
    shutil.copyfile(warehouse_partition_file(fresh_settings, "bank_b"), warehouse_partition_file(fresh_settings, "bank_a"))

    with pytest.raises(WarehousePartitionUnreadable) as caught:
        build_extract(fresh_settings, "bank_a")

    assert caught.value.code == "document_owner_mismatch"
    assert "bank_b/data/v1" in caught.value.message
    assert not extract_dir(fresh_settings, "bank_a").exists()


def test_partition_of_other_table_rejected(fresh_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    store = open_keystore(fresh_settings)
    other = write_partition(fresh_settings, store, "bank_a", _plain_frame(demo_parquet, "bank_a"), table="loans")
    shutil.copyfile(other, warehouse_partition_file(fresh_settings, "bank_a"))

    with pytest.raises(WarehousePartitionUnreadable) as caught:
        read_partition(fresh_settings, store, "bank_a")

    assert caught.value.code == "ciphertext_tampered"


def test_decrypted_non_parquet_rejected(fresh_settings: Settings) -> None:
    store = open_keystore(fresh_settings)
    encrypt_document(store, "bank_a", io.BytesIO(b"not a parquet file"), warehouse_partition_file(fresh_settings, "bank_a"),
                     partition_associated_data("bank_a"))

    with pytest.raises(WarehousePartitionInvalid) as caught:
        build_extract(fresh_settings, "bank_a")

    assert caught.value.code == "warehouse_partition_invalid"
    assert "load-demo" in caught.value.message
    assert not extract_dir(fresh_settings, "bank_a").exists()


def test_build_migrates_plaintext_partition(bare_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    plaintext = plaintext_partition_file(bare_settings, "bank_b")
    encrypted = warehouse_partition_file(bare_settings, "bank_b")
    assert warehouse_institutions(bare_settings) == list(DEMO_INSTITUTIONS)
    store = ensure_platform_keys(bare_settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(bare_settings)

    folder = build_extract(bare_settings, "bank_b")

    assert not plaintext.exists()
    assert encrypted.read_bytes().startswith(b"RSSG")
    assert oct(encrypted.stat().st_mode & 0o777) == oct(0o600)
    assert read_partition_bytes(bare_settings, store, "bank_b") == demo_parquet["bank_b"]
    assert plaintext_partition_file(bare_settings, "bank_a").exists()  # other institutions migrate on their build
    expected = watermarked(masked_demo(_plain_frame(demo_parquet, "bank_b"), store.current("bank_b", "token").key),
                           bare_settings, folder)
    assert pl.read_parquet(folder / "applications.parquet").sort("application_id").equals(expected.sort("application_id"))
    assert sorted(path.name for path in encrypted.parent.iterdir()) == ["part-0.parquet.rssg"]


def test_migration_finishes_interrupted_run(bare_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    store = ensure_platform_keys(bare_settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(bare_settings)
    write_partition(bare_settings, store, "bank_a", _plain_frame(demo_parquet, "bank_a"))
    plaintext = plaintext_partition_file(bare_settings, "bank_a")
    plaintext.write_bytes(demo_parquet["bank_a"])  # as left by a run stopped before the delete

    assert migrate_plaintext_partition(bare_settings, store, "bank_a")
    assert not plaintext.exists()
    assert not migrate_plaintext_partition(bare_settings, store, "bank_a")


def test_migration_mismatch_keeps_plaintext(bare_settings: Settings, demo_parquet: dict[str, bytes]) -> None:
    store = ensure_platform_keys(bare_settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(bare_settings)
    write_partition(bare_settings, store, "bank_a", _plain_frame(demo_parquet, "bank_b"))
    plaintext = plaintext_partition_file(bare_settings, "bank_a")
    plaintext.write_bytes(demo_parquet["bank_a"])

    with pytest.raises(WarehouseMigrationMismatch) as caught:
        build_extract(bare_settings, "bank_a")

    assert caught.value.code == "warehouse_migration_mismatch"
    assert str(plaintext) in caught.value.message
    assert plaintext.read_bytes() == demo_parquet["bank_a"]
    assert not extract_dir(bare_settings, "bank_a").exists()
