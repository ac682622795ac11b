"""Key store: lifecycle, crypto-shredding, master-key rotation, backups, master key files and audit events."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from regsandbox_core import keystore as ks
from regsandbox_core.keystore import (
    BackupInvalid,
    EnvMasterKey,
    FileMasterKey,
    KeyDestroyed,
    KeyNotActive,
    KeyRevoked,
    KeyStateInvalid,
    KeyStore,
    KeyStoreCorrupt,
    KeyStoreInputInvalid,
    KeyVersionUnknown,
    MasterKeyMismatch,
    MasterKeyProvider,
    MasterKeyUnavailable,
    NoActiveKey,
)
from regsandbox_core.sm import DecryptionFailed, sm2_public_key_from_private, sm4_gcm_decrypt, sm4_gcm_encrypt

CHINESE = re.compile(r"[\u4e00-\u9fff]")
NONCE = bytes(12)
BACKUP_KEY = bytes(range(16))


@pytest.fixture
def events() -> list[tuple]:
    return []


@pytest.fixture
def master(tmp_path: Path) -> FileMasterKey:
    return FileMasterKey.create(tmp_path / "secrets" / "master.key")


@pytest.fixture
def store(tmp_path: Path, master: FileMasterKey, events: list[tuple]) -> KeyStore:
    return KeyStore(tmp_path / "keys" / "keystore.json", master, on_event=lambda *event: events.append(event))


def states(store: KeyStore, owner: str, kind: str) -> dict[int, str]:
    return {entry["version"]: entry["state"] for entry in store.metadata()["keys"]
            if entry["owner"] == owner and entry["kind"] == kind}


# --- key generation and use ---


def test_generate_kinds_and_sizes(store: KeyStore) -> None:
    assert store.generate("bank_a", "data") == 1
    assert store.generate("bank_a", "token") == 1
    assert store.generate("platform", "signing") == 1

    data = store.current("bank_a", "data")
    token = store.current("bank_a", "token")
    signing = store.current("platform", "signing")
    assert len(data.key) == 16
    assert len(token.key) == 32
    assert len(signing.key) == 32
    assert signing.public_key == sm2_public_key_from_private(signing.key)
    assert data.public_key is None
    assert signing.label == "platform/signing/v1"


def test_store_file_mode_0600(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    assert store.path.stat().st_mode & 0o777 == 0o600


def test_key_repr_hides_material(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    key = store.current("bank_a", "data")
    assert key.key.hex() not in repr(key)


def test_store_file_has_no_clear_material(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.generate("platform", "signing")
    text = store.path.read_text(encoding="utf-8")
    for key in (store.current("bank_a", "data").key, store.current("platform", "signing").key):
        assert key.hex() not in text
        assert base64.b64encode(key).decode() not in text


@pytest.mark.parametrize("owner, kind", [("Bank-A", "data"), ("x", "data"), ("bank_a", "aes"), (None, "data")])
def test_invalid_owner_or_kind_rejected(store: KeyStore, owner: object, kind: object) -> None:
    with pytest.raises(KeyStoreInputInvalid) as raised:
        store.generate(owner, kind)  # type: ignore[arg-type]
    assert CHINESE.search(raised.value.message)


# --- rotation and lifecycle ---


def test_rotation_keeps_old_version_for_decryption(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    v1 = store.current("bank_a", "data")
    ciphertext = sm4_gcm_encrypt(v1.key, NONCE, b"loan records", b"bank_a")

    assert store.rotate("bank_a", "data") == 2
    current = store.current("bank_a", "data")
    assert current.version == 2
    assert current.key != v1.key
    assert states(store, "bank_a", "data") == {1: "decrypt_only", 2: "active"}
    assert sm4_gcm_decrypt(store.get("bank_a", "data", 1).key, NONCE, ciphertext, b"bank_a") == b"loan records"


def test_destroy_makes_old_data_unreadable(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    v1 = store.current("bank_a", "data")
    ciphertext = sm4_gcm_encrypt(v1.key, NONCE, b"loan records")
    store.rotate("bank_a", "data")

    store.destroy("bank_a", "data", 1)

    with pytest.raises(KeyDestroyed) as raised:
        store.get("bank_a", "data", 1)
    assert raised.value.code == "key_destroyed"
    assert CHINESE.search(raised.value.message)
    entry = next(e for e in json.loads(store.path.read_text())["keys"] if e["version"] == 1)
    assert entry["wrapped"] is None
    assert entry["state"] == "destroyed"
    # Any other key, including the new version, fails on the old ciphertext.
    with pytest.raises(DecryptionFailed):
        sm4_gcm_decrypt(store.current("bank_a", "data").key, NONCE, ciphertext)


def test_destroyed_version_number_not_reused(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.destroy("bank_a", "data", 1)
    assert store.rotate("bank_a", "data") == 3


def test_destroy_active_rejected(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    with pytest.raises(KeyStateInvalid) as raised:
        store.destroy("bank_a", "data", 1)
    assert raised.value.code == "key_state_transition_invalid"
    assert "轮换或吊销" in raised.value.message
    assert store.current("bank_a", "data").version == 1


def test_revoked_key_rejected_for_use(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.revoke("bank_a", "data", 1, reason="suspected leak")

    with pytest.raises(NoActiveKey) as no_active:
        store.current("bank_a", "data")
    assert no_active.value.code == "key_no_active_version"
    with pytest.raises(KeyRevoked) as revoked:
        store.get("bank_a", "data", 1)
    assert revoked.value.code == "key_revoked"
    assert CHINESE.search(revoked.value.message)
    with pytest.raises(NoActiveKey):
        store.rotate("bank_a", "data")


def test_revoked_decrypt_only_rejected(store: KeyStore) -> None:
    store.generate("bank_a", "token")
    store.rotate("bank_a", "token")
    store.revoke("bank_a", "token", 1)
    with pytest.raises(KeyRevoked):
        store.get("bank_a", "token", 1)
    assert store.current("bank_a", "token").version == 2


@pytest.mark.parametrize("final_state", ["revoked", "destroyed"])
def test_reactivation_forbidden(store: KeyStore, final_state: str) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    if final_state == "revoked":
        store.revoke("bank_a", "data", 1)
    else:
        store.destroy("bank_a", "data", 1)

    with pytest.raises(KeyStateInvalid) as raised:
        store.activate("bank_a", "data", 1)
    assert raised.value.code == "key_state_transition_invalid"
    assert CHINESE.search(raised.value.message)
    assert states(store, "bank_a", "data")[1] == final_state
    assert store.current("bank_a", "data").version == 2


def test_double_revoke_and_destroy_rejected(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.revoke("bank_a", "data", 1)
    with pytest.raises(KeyStateInvalid):
        store.revoke("bank_a", "data", 1)
    store.destroy("bank_a", "data", 1)
    with pytest.raises(KeyStateInvalid):
        store.destroy("bank_a", "data", 1)
    with pytest.raises(KeyStateInvalid):
        store.revoke("bank_a", "data", 1)


def test_pending_version_then_activate(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    assert store.generate("bank_a", "data", activate=False) == 2

    with pytest.raises(KeyNotActive) as raised:
        store.get("bank_a", "data", 2)
    assert raised.value.code == "key_not_active"
    assert store.current("bank_a", "data").version == 1

    store.activate("bank_a", "data", 2)
    assert states(store, "bank_a", "data") == {1: "decrypt_only", 2: "active"}


def test_activate_decrypt_only_undoes_rotation(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.activate("bank_a", "data", 1)
    assert states(store, "bank_a", "data") == {1: "active", 2: "decrypt_only"}


def test_unknown_version_raises(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    with pytest.raises(KeyVersionUnknown) as raised:
        store.get("bank_a", "data", 7)
    assert raised.value.code == "key_version_unknown"
    assert "v7" in raised.value.message
    with pytest.raises(KeyVersionUnknown):
        store.get("bank_b", "data", 1)


def test_empty_store_has_no_active_key(store: KeyStore) -> None:
    with pytest.raises(NoActiveKey):
        store.current("platform", "signing")
    assert not store.path.exists()


def test_signing_public_key_survives_destroy(store: KeyStore) -> None:
    store.generate("platform", "signing")
    public_key = store.current("platform", "signing").public_key
    store.rotate("platform", "signing")
    store.destroy("platform", "signing", 1)
    assert store.public_key("platform", 1) == public_key
    store.revoke("platform", "signing", 2)
    with pytest.raises(KeyRevoked):
        store.public_key("platform", 2)


# --- integrity of the file ---


def test_edited_state_detected(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.revoke("bank_a", "data", 1)
    document = json.loads(store.path.read_text())
    for entry in document["keys"]:
        if entry["version"] == 1:
            entry["state"] = "decrypt_only"
    store.path.write_text(json.dumps(document))

    with pytest.raises(KeyStoreCorrupt) as raised:
        store.get("bank_a", "data", 1)
    assert raised.value.code == "keystore_corrupt"
    assert CHINESE.search(raised.value.message)


def test_wrapped_key_bound_to_its_entry(store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.generate("bank_b", "data")
    keys = json.loads(store.path.read_text())["keys"]
    keys[0]["wrapped"], keys[1]["wrapped"] = keys[1]["wrapped"], keys[0]["wrapped"]
    store._save(keys)  # resealed, so only the wrapping's associated data can catch the swap

    with pytest.raises(KeyStoreCorrupt):
        store.current("bank_a", "data")


def test_garbage_file_is_corrupt(store: KeyStore) -> None:
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("not json")
    with pytest.raises(KeyStoreCorrupt):
        store.metadata()


# --- master key rotation ---


class FailingMaster(MasterKeyProvider):
    """Wraps the first key and then fails, to check that a rewrap writes nothing on failure."""

    def __init__(self, inner: MasterKeyProvider) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def key_id(self) -> str:
        return "failing"

    def wrap(self, key_bytes: bytes, aad: bytes) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise OSError("HSM session lost")
        return self.inner.wrap(key_bytes, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return self.inner.unwrap(blob, aad)


def test_rewrap_all_switches_master(tmp_path: Path, store: KeyStore, master: FileMasterKey) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.destroy("bank_a", "data", 1)
    store.generate("platform", "signing")
    before = {key: store.current(*key).key for key in [("bank_a", "data"), ("platform", "signing")]}
    new_master = FileMasterKey.create(tmp_path / "secrets" / "master-2.key")

    store.rewrap_all(new_master)

    reopened = KeyStore(store.path, new_master)
    for (owner, kind), key in before.items():
        assert reopened.current(owner, kind).key == key
    with pytest.raises(KeyDestroyed):
        reopened.get("bank_a", "data", 1)
    assert reopened.metadata()["master_key_id"] == new_master.key_id
    with pytest.raises(MasterKeyMismatch) as raised:
        KeyStore(store.path, master).current("bank_a", "data")
    assert raised.value.code == "master_key_mismatch"
    assert CHINESE.search(raised.value.message)


def test_rewrap_all_is_all_or_nothing(store: KeyStore, master: FileMasterKey, tmp_path: Path) -> None:
    store.generate("bank_a", "data")
    store.generate("bank_b", "data")
    before = store.path.read_bytes()
    failing = FailingMaster(FileMasterKey.create(tmp_path / "other.key"))

    with pytest.raises(OSError):
        store.rewrap_all(failing)

    assert store.path.read_bytes() == before
    assert store.master is master
    assert len(store.current("bank_b", "data").key) == 16


# --- backup and restore ---


def test_backup_restore_round_trip(tmp_path: Path, store: KeyStore) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.generate("bank_a", "token")
    store.generate("platform", "signing")
    store.rotate("platform", "signing")
    store.destroy("platform", "signing", 1)
    backup = tmp_path / "backup" / "keystore.bak"

    store.backup(backup, BACKUP_KEY)
    assert backup.stat().st_mode & 0o777 == 0o600
    for key in (store.get("bank_a", "data", 1).key, store.current("bank_a", "token").key):
        assert key not in backup.read_bytes()

    other_master = FileMasterKey.create(tmp_path / "restore-master.key")
    restored = KeyStore(tmp_path / "restored" / "keystore.json", other_master)
    assert restored.restore(backup, BACKUP_KEY) == 5

    assert restored.metadata()["keys"] == store.metadata()["keys"]
    for owner, kind, version in [("bank_a", "data", 1), ("bank_a", "data", 2), ("bank_a", "token", 1),
                                 ("platform", "signing", 2)]:
        assert restored.get(owner, kind, version).key == store.get(owner, kind, version).key
    with pytest.raises(KeyDestroyed):
        restored.get("platform", "signing", 1)


@pytest.mark.parametrize("offset", [0, 10, -1, -40])
def test_tampered_backup_rejected(tmp_path: Path, store: KeyStore, offset: int) -> None:
    store.generate("bank_a", "data")
    backup = tmp_path / "keystore.bak"
    store.backup(backup, BACKUP_KEY)
    blob = bytearray(backup.read_bytes())
    blob[offset] ^= 0x01
    backup.write_bytes(bytes(blob))

    target = KeyStore(tmp_path / "restored.json", store.master)
    with pytest.raises(BackupInvalid) as raised:
        target.restore(backup, BACKUP_KEY)
    assert raised.value.code == "keystore_backup_invalid"
    assert CHINESE.search(raised.value.message)
    assert not target.path.exists()


def test_backup_wrong_key_rejected(tmp_path: Path, store: KeyStore) -> None:
    store.generate("bank_a", "data")
    backup = tmp_path / "keystore.bak"
    store.backup(backup, BACKUP_KEY)
    with pytest.raises(BackupInvalid):
        KeyStore(tmp_path / "restored.json", store.master).restore(backup, bytes(16))


def test_restore_into_nonempty_store_needs_replace(tmp_path: Path, store: KeyStore) -> None:
    store.generate("bank_a", "data")
    backup = tmp_path / "keystore.bak"
    store.backup(backup, BACKUP_KEY)
    key = store.current("bank_a", "data").key
    store.rotate("bank_a", "data")

    with pytest.raises(KeyStoreInputInvalid) as raised:
        store.restore(backup, BACKUP_KEY)
    assert raised.value.code == "keystore_not_empty"

    store.restore(backup, BACKUP_KEY, replace=True)
    assert store.current("bank_a", "data").key == key
    assert store.current("bank_a", "data").version == 1


@pytest.mark.parametrize("backup_key", [b"short", "0" * 16, bytes(32)])
def test_backup_key_size_checked(tmp_path: Path, store: KeyStore, backup_key: object) -> None:
    store.generate("bank_a", "data")
    with pytest.raises(KeyStoreInputInvalid):
        store.backup(tmp_path / "keystore.bak", backup_key)  # type: ignore[arg-type]
    assert not (tmp_path / "keystore.bak").exists()


# --- master key sources ---


def test_master_key_0644_rejected(master: FileMasterKey) -> None:
    os.chmod(master.path, 0o644)
    with pytest.raises(MasterKeyUnavailable) as raised:
        FileMasterKey(master.path)
    assert raised.value.code == "master_key_unavailable"
    assert "0644" in raised.value.message
    assert "chmod 600" in raised.value.message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_master_key_group_bits_rejected(master: FileMasterKey, mode: int) -> None:
    os.chmod(master.path, mode)
    with pytest.raises(MasterKeyUnavailable):
        FileMasterKey(master.path)


def test_master_key_file_0400_accepted(master: FileMasterKey) -> None:
    os.chmod(master.path, 0o400)
    assert FileMasterKey(master.path).key_id == master.key_id


def test_missing_master_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyUnavailable) as raised:
        FileMasterKey(tmp_path / "secrets" / "master.key")
    assert "不存在" in raised.value.message
    assert "REGSANDBOX_MASTER_KEY" in raised.value.message


def test_master_key_symlink_rejected(tmp_path: Path, master: FileMasterKey) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(master.path)
    with pytest.raises(MasterKeyUnavailable) as raised:
        FileMasterKey(link)
    assert "符号链接" in raised.value.message


def test_master_key_wrong_length_rejected(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(bytes(20)).decode())
    os.chmod(path, 0o600)
    with pytest.raises(MasterKeyUnavailable) as raised:
        FileMasterKey(path)
    assert "20 字节" in raised.value.message


def test_master_key_create_no_overwrite(master: FileMasterKey) -> None:
    with pytest.raises(MasterKeyUnavailable):
        FileMasterKey.create(master.path)
    assert master.path.stat().st_mode & 0o777 == 0o600


def test_env_master_key(master: FileMasterKey, tmp_path: Path) -> None:
    value = master.path.read_text().strip()
    from_env = EnvMasterKey(environ={"REGSANDBOX_MASTER_KEY": value})
    assert from_env.key_id == master.key_id
    blob = master.wrap(b"k" * 16, b"aad")
    assert from_env.unwrap(blob, b"aad") == b"k" * 16
    with pytest.raises(DecryptionFailed):
        from_env.unwrap(blob, b"other aad")


@pytest.mark.parametrize("value", [None, "", "not base64!", base64.b64encode(bytes(8)).decode()])
def test_env_master_key_invalid(value: str | None) -> None:
    environ = {} if value is None else {"REGSANDBOX_MASTER_KEY": value}
    with pytest.raises(MasterKeyUnavailable) as raised:
        EnvMasterKey(environ=environ)
    assert CHINESE.search(raised.value.message)


def test_master_key_from_environment_prefers_env(tmp_path: Path) -> None:
    env_value = base64.b64encode(bytes(range(16))).decode()
    provider = ks.master_key_from_environment(tmp_path, {"REGSANDBOX_MASTER_KEY": env_value})
    assert isinstance(provider, EnvMasterKey)
    with pytest.raises(MasterKeyUnavailable):
        ks.master_key_from_environment(tmp_path, {})
    FileMasterKey.create(tmp_path / "secrets" / "master.key")
    assert isinstance(ks.master_key_from_environment(tmp_path, {}), FileMasterKey)


# --- audit events and metadata ---


def test_audit_receives_every_operation(tmp_path: Path, store: KeyStore, events: list[tuple]) -> None:
    new_master = FileMasterKey.create(tmp_path / "new.key")
    backup = tmp_path / "keystore.bak"
    operations = [
        ("generate", lambda: store.generate("bank_a", "data"), "success"),
        ("current", lambda: store.current("bank_a", "data"), "success"),
        ("rotate", lambda: store.rotate("bank_a", "data"), "success"),
        ("get", lambda: store.get("bank_a", "data", 1), "success"),
        ("get", lambda: store.get("bank_a", "data", 9), "failure"),
        ("generate", lambda: store.generate("bank_a", "data", activate=False), "success"),
        ("activate", lambda: store.activate("bank_a", "data", 3), "success"),
        ("revoke", lambda: store.revoke("bank_a", "data", 2, reason="test"), "success"),
        ("destroy", lambda: store.destroy("bank_a", "data", 3), "failure"),
        ("destroy", lambda: store.destroy("bank_a", "data", 2), "success"),
        ("activate", lambda: store.activate("bank_a", "data", 2), "failure"),
        ("current", lambda: store.current("bank_b", "token"), "failure"),
        ("rotate", lambda: store.rotate("bank_b", "token"), "failure"),
        ("generate", lambda: store.generate("Bad Owner", "data"), "failure"),
        ("generate", lambda: store.generate("platform", "signing"), "success"),
        ("public_key", lambda: store.public_key("platform", 1), "success"),
        ("metadata", lambda: store.metadata(), "success"),
        ("backup", lambda: store.backup(backup, BACKUP_KEY), "success"),
        ("backup", lambda: store.backup(backup, b"short"), "failure"),
        ("restore", lambda: store.restore(backup, BACKUP_KEY), "failure"),
        ("restore", lambda: store.restore(backup, BACKUP_KEY, replace=True), "success"),
        ("rewrap_all", lambda: store.rewrap_all(new_master), "success"),
    ]
    for action, operation, outcome in operations:
        count = len(events)
        try:
            operation()
        except ks.KeyStoreError:
            pass
        assert len(events) == count + 1, action
        got_action, owner, kind, version, got_outcome, detail = events[-1]
        assert (got_action, got_outcome) == (action, outcome)
        assert isinstance(owner, str)
        assert isinstance(kind, str)
        assert version is None or isinstance(version, int)
        if outcome == "failure":
            assert detail["code"]

    assert events[0][:5] == ("generate", "bank_a", "data", 1, "success")
    assert events[4][5]["code"] == "key_version_unknown"
    assert events[8][5]["code"] == "key_state_transition_invalid"
    assert events[7][5]["reason"] == "test"


def test_audit_reports_unexpected_errors(tmp_path: Path, store: KeyStore, events: list[tuple]) -> None:
    store.generate("bank_a", "data")
    with pytest.raises(OSError):
        store.rewrap_all(FailingMaster(FileMasterKey.create(tmp_path / "x.key")))
    assert events[-1][0] == "rewrap_all"
    assert events[-1][4] == "failure"
    assert events[-1][5]["code"] == "internal_error"


def test_metadata_and_audit_contain_no_material(tmp_path: Path, store: KeyStore, events: list[tuple]) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.generate("bank_a", "token")
    store.generate("platform", "signing")
    store.backup(tmp_path / "keystore.bak", BACKUP_KEY)
    materials = [
        store.get("bank_a", "data", 1).key,
        store.current("bank_a", "data").key,
        store.current("bank_a", "token").key,
        store.current("platform", "signing").key,
    ]

    serialized = json.dumps(store.metadata(), ensure_ascii=False) + repr(events)

    for material in materials:
        assert material.hex() not in serialized
        assert material.hex().upper() not in serialized
        assert base64.b64encode(material).decode() not in serialized
        assert base64.urlsafe_b64encode(material).decode() not in serialized
    assert "wrapped" not in serialized
    assert store.metadata()["keys"][0]["state"] == "decrypt_only"


def test_master_key_directory_rejected(tmp_path: Path) -> None:
    (tmp_path / "master.key").mkdir()
    with pytest.raises(MasterKeyUnavailable) as raised:
        FileMasterKey(tmp_path / "master.key")
    assert "不是普通文件" in raised.value.message


def test_master_key_other_owner_rejected(master: FileMasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ks.os, "geteuid", lambda: master.path.stat().st_uid + 1)
    with pytest.raises(MasterKeyUnavailable) as raised:
        FileMasterKey(master.path)
    assert "属主" in raised.value.message


def rewrite_backup(path: Path, edit) -> None:
    """Decrypt a backup with BACKUP_KEY, apply ``edit`` to its document and encrypt it again."""
    blob = path.read_bytes()
    header = len(ks._BACKUP_MAGIC)
    nonce = blob[header : header + 12]
    document = json.loads(sm4_gcm_decrypt(BACKUP_KEY, nonce, blob[header + 12 :], ks._BACKUP_MAGIC))
    edit(document)
    plaintext = json.dumps(document).encode()
    path.write_bytes(ks._BACKUP_MAGIC + nonce + sm4_gcm_encrypt(BACKUP_KEY, nonce, plaintext, ks._BACKUP_MAGIC))


def duplicate_entry(document: dict) -> None:
    document["keys"].append(dict(document["keys"][0]))


def two_active(document: dict) -> None:
    for entry in document["keys"]:
        entry["state"] = "active"


def destroyed_with_material(document: dict) -> None:
    document["keys"][0]["state"] = "destroyed"


def wrong_public_key(document: dict) -> None:
    for entry in document["keys"]:
        if entry["kind"] == "signing":
            entry["public_key"] = "04" + "00" * 64


def missing_field(document: dict) -> None:
    del document["keys"][0]["state"]


@pytest.mark.parametrize("edit", [duplicate_entry, two_active, destroyed_with_material, wrong_public_key, missing_field])
def test_inconsistent_backup_rejected(tmp_path: Path, store: KeyStore, edit) -> None:
    store.generate("bank_a", "data")
    store.rotate("bank_a", "data")
    store.generate("platform", "signing")
    backup = tmp_path / "keystore.bak"
    store.backup(backup, BACKUP_KEY)
    rewrite_backup(backup, edit)

    target = KeyStore(tmp_path / "restored.json", store.master)
    with pytest.raises(BackupInvalid):
        target.restore(backup, BACKUP_KEY)
    assert not target.path.exists()


def test_import_key_stores_given_bytes(tmp_path):
    store = KeyStore(tmp_path / "keystore.json", FileMasterKey.create(tmp_path / "master.key"))
    material = bytes(range(32))
    assert store.import_key("bank_a", "token", material) == 1
    assert store.current("bank_a", "token").key == material


def test_import_key_rejects_signing_and_wrong_size(tmp_path):
    store = KeyStore(tmp_path / "keystore.json", FileMasterKey.create(tmp_path / "master.key"))
    with pytest.raises(KeyStoreInputInvalid):
        store.import_key("platform", "signing", bytes(32))
    with pytest.raises(KeyStoreInputInvalid):
        store.import_key("bank_a", "token", bytes(16))
