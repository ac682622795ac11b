"""Documents encrypted under their owner's data key: key IDs, owner checks, key states, all-or-nothing output."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from regsandbox_core.documents import (
    DocumentKeyIdInvalid,
    DocumentOwnerMismatch,
    decrypt_document,
    encrypt_document,
    read_document_key,
)
from regsandbox_core.keystore import KeyDestroyed, KeyRevoked, KeyStore, NoActiveKey
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings
from regsandbox_core.streaming import CiphertextTruncated, encrypt_stream

CONTENT = "机构报送材料，第一季度。\n".encode("utf-8") * 20000


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeyStore:
    monkeypatch.delenv("REGSANDBOX_MASTER_KEY", raising=False)
    return ensure_platform_keys(Settings(data_dir=tmp_path / "data"), ["bank_a", "bank_b"], on_event=None)


@pytest.fixture
def encrypted(store: KeyStore, tmp_path: Path) -> Path:
    source = tmp_path / "report.xlsx"
    source.write_bytes(CONTENT)
    target = tmp_path / "report.xlsx.rssg"
    document = encrypt_document(store, "bank_a", source, target)
    assert document.key_label == "bank_a/data/v1"
    return target


def test_round_trip_paths(store: KeyStore, encrypted: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.xlsx"

    document = decrypt_document(store, "bank_a", encrypted, output)

    assert output.read_bytes() == CONTENT
    assert (document.owner, document.version) == ("bank_a", 1)
    assert read_document_key(encrypted) == ("bank_a", 1)
    assert CONTENT[:60] not in encrypted.read_bytes()


def test_round_trip_streams(store: KeyStore) -> None:
    ciphertext = io.BytesIO()
    encrypt_document(store, "bank_b", io.BytesIO(CONTENT), ciphertext, b"intake:42")
    ciphertext.seek(0)
    plaintext = io.BytesIO()

    decrypt_document(store, "bank_b", ciphertext, plaintext, b"intake:42")

    assert plaintext.getvalue() == CONTENT


def test_other_owner_rejected(store: KeyStore, encrypted: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.xlsx"

    with pytest.raises(DocumentOwnerMismatch) as raised:
        decrypt_document(store, "bank_b", encrypted, output)

    assert raised.value.code == "document_owner_mismatch"
    assert "bank_a/data/v1" in raised.value.message
    assert not output.exists()


def test_foreign_key_id_rejected(store: KeyStore, tmp_path: Path) -> None:
    ciphertext = io.BytesIO()
    encrypt_stream(store.current("bank_a", "data").key, "bank_a/v1", io.BytesIO(b"x"), ciphertext)
    ciphertext.seek(0)

    with pytest.raises(DocumentKeyIdInvalid):
        decrypt_document(store, "bank_a", ciphertext, io.BytesIO())


def test_rotated_version_still_decrypts(store: KeyStore, encrypted: Path, tmp_path: Path) -> None:
    store.rotate("bank_a", "data")
    newer = tmp_path / "newer.rssg"
    assert encrypt_document(store, "bank_a", encrypted, newer).key_label == "bank_a/data/v2"

    decrypt_document(store, "bank_a", encrypted, tmp_path / "out.xlsx")

    assert (tmp_path / "out.xlsx").read_bytes() == CONTENT


def test_revoked_then_destroyed_version(store: KeyStore, encrypted: Path, tmp_path: Path) -> None:
    store.rotate("bank_a", "data")
    store.revoke("bank_a", "data", 1, "test")
    with pytest.raises(KeyRevoked):
        decrypt_document(store, "bank_a", encrypted, tmp_path / "out.xlsx")

    store.destroy("bank_a", "data", 1)
    with pytest.raises(KeyDestroyed):
        decrypt_document(store, "bank_a", encrypted, tmp_path / "out.xlsx")
    assert not (tmp_path / "out.xlsx").exists()


def test_truncated_file_leaves_no_output(store: KeyStore, encrypted: Path, tmp_path: Path) -> None:
    data = encrypted.read_bytes()
    encrypted.write_bytes(data[: len(data) - 100])
    output = tmp_path / "out.xlsx"

    with pytest.raises(CiphertextTruncated):
        decrypt_document(store, "bank_a", encrypted, output)

    assert not output.exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".out.xlsx")] == []


def test_no_active_key_rejected(store: KeyStore, tmp_path: Path) -> None:
    store.revoke("bank_b", "data", 1, "test")

    with pytest.raises(NoActiveKey):
        encrypt_document(store, "bank_b", io.BytesIO(b"x"), tmp_path / "x.rssg")

    assert not (tmp_path / "x.rssg").exists()
