"""SM2-signed envelopes and detached file signatures: round trips and every edit that must fail."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pytest

from regsandbox_core.keystore import FileMasterKey, KeyStore
from regsandbox_core.sm import sm2_sign, sm2_verify
from regsandbox_core.signing import (
    SignatureInvalid,
    SignedObjectInvalid,
    canonical_statement,
    sign_file,
    sign_object,
    signature_path,
    verify_file,
    verify_object,
)

CHINESE = re.compile(r"[\u4e00-\u9fff]")
MANIFEST = {
    "institution": "bank_a",
    "dataset": "applications",
    "row_count": 1200,
    "files": [{"name": "applications.parquet", "sm3": "ab" * 32}],
    "note": "脱敏数据集",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    folder = tmp_path_factory.mktemp("signing")
    keystore = KeyStore(folder / "keystore.json", FileMasterKey.create(folder / "master.key"))
    keystore.generate("platform", "signing")
    return keystore


@pytest.fixture(scope="module")
def envelope(store: KeyStore) -> dict:
    return sign_object(store, "extract_manifest", MANIFEST)


def test_envelope_shape(envelope: dict, store: KeyStore) -> None:
    assert envelope["regsandbox_signed"] == 1
    assert envelope["kind"] == "extract_manifest"
    assert envelope["payload"] == MANIFEST
    signature = envelope["signature"]
    assert signature["algorithm"] == "SM2-SM3"
    assert signature["key"] == "platform/signing/v1"
    assert signature["user_id"] == "1234567812345678"
    assert bytes.fromhex(signature["public_key"]) == store.public_key("platform", 1)
    assert signature["signed_at"].endswith("+00:00")


def test_signature_covers_canonical_statement(envelope: dict, store: KeyStore) -> None:
    signature = envelope["signature"]
    statement = canonical_statement("extract_manifest", MANIFEST, signature["signed_at"], signature["key"])
    assert statement.startswith(b'{"key":"platform/signing/v1","kind":"extract_manifest","payload":{"dataset"')
    assert "脱敏数据集".encode() in statement
    sm2_verify(store.public_key("platform", 1), statement, base64.b64decode(signature["value"]))


def test_verify_round_trip_through_json(envelope: dict, store: KeyStore) -> None:
    reread = json.loads(json.dumps(envelope, indent=4, ensure_ascii=True))
    verified = verify_object(reread, store)
    assert verified.kind == "extract_manifest"
    assert verified.key == "platform/signing/v1"
    assert verified.payload == MANIFEST
    assert verified.signed_at == envelope["signature"]["signed_at"]


def test_verify_with_trusted_public_keys(envelope: dict, store: KeyStore) -> None:
    trusted = {"platform/signing/v1": store.public_key("platform", 1)}
    assert verify_object(envelope, trusted).payload["row_count"] == 1200
    with pytest.raises(SignatureInvalid) as raised:
        verify_object(envelope, {"platform/signing/v2": store.public_key("platform", 1)})
    assert "不在受信任" in raised.value.message


def edit_row_count(envelope: dict) -> None:
    envelope["payload"]["row_count"] = 1201


def edit_nested(envelope: dict) -> None:
    envelope["payload"]["files"][0]["sm3"] = "cd" * 32


def edit_kind(envelope: dict) -> None:
    envelope["kind"] = "report_manifest"


def edit_time(envelope: dict) -> None:
    envelope["signature"]["signed_at"] = "2026-01-01T00:00:00+00:00"


def add_field(envelope: dict) -> None:
    envelope["payload"]["extra"] = True


def edit_value(envelope: dict) -> None:
    raw = bytearray(base64.b64decode(envelope["signature"]["value"]))
    raw[-1] ^= 0x01
    envelope["signature"]["value"] = base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("edit", [edit_row_count, edit_nested, edit_kind, edit_time, add_field, edit_value])
def test_edited_envelope_fails(envelope: dict, store: KeyStore, edit) -> None:
    tampered = copy.deepcopy(envelope)
    edit(tampered)
    with pytest.raises(SignatureInvalid) as raised:
        verify_object(tampered, store)
    assert raised.value.code == "signature_invalid"
    assert CHINESE.search(raised.value.message)


def test_edited_row_count_names_what_may_have_changed(envelope: dict, store: KeyStore) -> None:
    tampered = copy.deepcopy(envelope)
    edit_row_count(tampered)
    with pytest.raises(SignatureInvalid) as raised:
        verify_object(tampered, store)
    assert "内容" in raised.value.message
    assert "extract_manifest" in raised.value.message


def test_signature_over_other_bytes_fails(envelope: dict, store: KeyStore) -> None:
    private_key = store.current("platform", "signing").key
    forged = copy.deepcopy(envelope)
    forged["payload"]["row_count"] = 5
    # A real SM2 signature by the platform key, but over the statement of the original payload
    # serialised differently (with spaces): the canonical bytes differ, so it must fail.
    other_bytes = json.dumps({"kind": forged["kind"], "payload": forged["payload"]}).encode()
    forged["signature"]["value"] = base64.b64encode(sm2_sign(private_key, other_bytes)).decode()
    with pytest.raises(SignatureInvalid):
        verify_object(forged, store)


def test_public_key_swap_fails(envelope: dict, store: KeyStore, tmp_path: Path) -> None:
    other = KeyStore(tmp_path / "other.json", FileMasterKey.create(tmp_path / "other.key"))
    other.generate("platform", "signing")
    forged = sign_object(other, "extract_manifest", MANIFEST)
    # Signed by a key of the same label in another store: the trusted key differs.
    with pytest.raises(SignatureInvalid) as raised:
        verify_object(forged, store)
    assert "公钥" in raised.value.message


def test_key_label_edit_fails(store: KeyStore, tmp_path: Path) -> None:
    local = KeyStore(tmp_path / "ks.json", store.master)
    local.generate("platform", "signing")
    local.rotate("platform", "signing")
    envelope = sign_object(local, "model_review", {"model": "pd_v3", "decision": "approved"})
    assert envelope["signature"]["key"] == "platform/signing/v2"
    envelope["signature"]["key"] = "platform/signing/v1"
    envelope["signature"]["public_key"] = local.public_key("platform", 1).hex()
    with pytest.raises(SignatureInvalid):
        verify_object(envelope, local)


def test_revoked_signing_key_rejected(tmp_path: Path, store: KeyStore) -> None:
    local = KeyStore(tmp_path / "ks.json", store.master)
    local.generate("platform", "signing")
    envelope = sign_object(local, "notebook_approval", {"notebook": "pd.ipynb"})
    local.rotate("platform", "signing")
    assert verify_object(envelope, local).kind == "notebook_approval"
    local.revoke("platform", "signing", 1)
    with pytest.raises(SignatureInvalid) as raised:
        verify_object(envelope, local)
    assert "吊销" in raised.value.message


def test_destroyed_signing_key_still_verifies(tmp_path: Path, store: KeyStore) -> None:
    local = KeyStore(tmp_path / "ks.json", store.master)
    local.generate("platform", "signing")
    envelope = sign_object(local, "report_manifest", {"report": "monthly"})
    local.rotate("platform", "signing")
    local.destroy("platform", "signing", 1)
    assert verify_object(envelope, local).payload == {"report": "monthly"}


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"regsandbox_signed": 2},
        {"regsandbox_signed": 1, "kind": "x", "payload": {}},
        "not a dict",
    ],
)
def test_incomplete_envelope_rejected(broken: object, store: KeyStore) -> None:
    with pytest.raises(SignatureInvalid):
        verify_object(broken, store)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value",
    [("algorithm", "SM2-SHA256"), ("user_id", "alice"), ("key", "platform/data/v1"), ("value", "!!")],
)
def test_envelope_field_checks(envelope: dict, store: KeyStore, field: str, value: str) -> None:
    tampered = copy.deepcopy(envelope)
    tampered["signature"][field] = value
    with pytest.raises(SignatureInvalid):
        verify_object(tampered, store)


@pytest.mark.parametrize("payload", [["a"], {"x": float("nan")}, {"x": object()}])
def test_unsignable_payload_rejected(store: KeyStore, payload: object) -> None:
    with pytest.raises(SignedObjectInvalid) as raised:
        sign_object(store, "extract_manifest", payload)  # type: ignore[arg-type]
    assert CHINESE.search(raised.value.message)


@pytest.mark.parametrize("kind", ["", "Extract", "a b", 5])
def test_invalid_kind_rejected(store: KeyStore, kind: object) -> None:
    with pytest.raises(SignedObjectInvalid):
        sign_object(store, kind, MANIFEST)  # type: ignore[arg-type]


def test_payload_normalised_like_json(store: KeyStore) -> None:
    envelope = sign_object(store, "extract_manifest", {"rows": (1, 2), "ok": True})
    assert envelope["payload"] == {"rows": [1, 2], "ok": True}
    assert verify_object(json.loads(json.dumps(envelope)), store).payload["rows"] == [1, 2]


# --- detached file signatures ---


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "applications.parquet"
    path.write_bytes(b"PAR1" + bytes(range(256)) * 40 + b"PAR1")
    path.chmod(0o640)
    return path


def test_sign_and_verify_file(store: KeyStore, data_file: Path) -> None:
    signature = sign_file(store, data_file, "extract_file")
    assert signature == signature_path(data_file)
    assert signature.name == "applications.parquet.sig"
    assert signature.stat().st_mode & 0o777 == 0o640

    verified = verify_file(data_file, store)
    assert verified.kind == "extract_file"
    assert verified.size == data_file.stat().st_size
    assert len(verified.sm3) == 64
    assert verified.name == "applications.parquet"
    assert verified.key == "platform/signing/v1"


def test_modified_file_fails(store: KeyStore, data_file: Path) -> None:
    sign_file(store, data_file, "extract_file")
    content = bytearray(data_file.read_bytes())
    content[100] ^= 0x01
    data_file.write_bytes(bytes(content))
    with pytest.raises(SignatureInvalid) as raised:
        verify_file(data_file, store)
    assert "SM3" in raised.value.message


def test_truncated_file_fails(store: KeyStore, data_file: Path) -> None:
    sign_file(store, data_file, "extract_file")
    data_file.write_bytes(data_file.read_bytes()[:-1])
    with pytest.raises(SignatureInvalid) as raised:
        verify_file(data_file, store)
    assert "大小" in raised.value.message


def test_signature_of_other_file_fails(store: KeyStore, data_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    other.write_bytes(b"other content")
    sign_file(store, other, "extract_file")
    with pytest.raises(SignatureInvalid):
        verify_file(data_file, store, signature=signature_path(other))


def test_edited_sig_file_fails(store: KeyStore, data_file: Path) -> None:
    signature = sign_file(store, data_file, "extract_file")
    envelope = json.loads(signature.read_text())
    envelope["payload"]["file"]["size"] += 1
    signature.write_text(json.dumps(envelope))
    with pytest.raises(SignatureInvalid):
        verify_file(data_file, store)


def test_object_signature_is_not_file_signature(store: KeyStore, data_file: Path) -> None:
    signature_path(data_file).write_text(json.dumps(sign_object(store, "extract_manifest", MANIFEST)))
    with pytest.raises(SignatureInvalid) as raised:
        verify_file(data_file, store)
    assert "不是文件签名" in raised.value.message


def test_missing_signature_file(store: KeyStore, data_file: Path) -> None:
    with pytest.raises(SignedObjectInvalid) as raised:
        verify_file(data_file, store)
    assert raised.value.code == "signature_missing"
