"""Platform secrets encrypted under the platform data key: creation, migration, rotation and refusals."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from regsandbox_core.errors import ConfigurationError
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.secrets import (
    PlatformSecrets,
    ensure_platform_secrets,
    legacy_secrets_file,
    load_platform_secrets,
    platform_secrets_key_version,
    secrets_file,
    set_smtp_credentials,
)
from regsandbox_core.settings import Settings

OTHER_MASTER_KEY = base64.b64encode(b"0123456789abcdef").decode("ascii")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("REGSANDBOX_MASTER_KEY", raising=False)
    return Settings(data_dir=tmp_path / "data")


def _document(settings: Settings) -> dict:
    return json.loads(secrets_file(settings).read_text(encoding="utf-8"))


def test_file_encrypted_and_private(settings: Settings) -> None:
    created = ensure_platform_secrets(settings)

    path = secrets_file(settings)
    text = path.read_text(encoding="utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.secrets_dir.stat().st_mode) == 0o700
    assert created.service_token not in text
    assert created.derivation_key not in text
    assert _document(settings)["key"] == "platform/data/v1"
    assert not legacy_secrets_file(settings).exists()
    assert load_platform_secrets(settings) == created
    assert ensure_platform_secrets(settings) == created


def test_load_creates_nothing(settings: Settings) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "SECRETS_MISSING"
    assert "regsandbox init" in raised.value.message
    assert not settings.data_dir.exists()


def test_plaintext_file_migrated(settings: Settings) -> None:
    values = {name: f"{name}-legacy-value" for name in
              ("service_token", "session_secret", "mlflow_flask_secret", "mlflow_admin_password", "derivation_key")}
    settings.secrets_dir.mkdir(parents=True)
    legacy_secrets_file(settings).write_text(json.dumps(values), encoding="utf-8")

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)
    assert raised.value.code == "SECRETS_NOT_ENCRYPTED"
    assert "regsandbox init" in raised.value.message

    migrated = ensure_platform_secrets(settings)

    assert migrated == PlatformSecrets(**values)
    assert not legacy_secrets_file(settings).exists()
    assert "legacy-value" not in secrets_file(settings).read_text(encoding="utf-8")
    assert load_platform_secrets(settings) == migrated


def test_invalid_plaintext_file_kept(settings: Settings) -> None:
    settings.secrets_dir.mkdir(parents=True)
    legacy_secrets_file(settings).write_text('{"service_token": "only-one"}', encoding="utf-8")

    with pytest.raises(ConfigurationError) as raised:
        ensure_platform_secrets(settings)

    assert raised.value.code == "SECRETS_INVALID"
    assert "derivation_key" in raised.value.message
    assert legacy_secrets_file(settings).exists()
    assert not secrets_file(settings).exists()


def test_rotation_reencrypts_at_next_ensure(settings: Settings) -> None:
    created = ensure_platform_secrets(settings)
    store = open_keystore(settings, on_event=None)
    store.rotate("platform", "data")

    assert load_platform_secrets(settings) == created  # v1 is decrypt_only and still opens the file
    assert platform_secrets_key_version(settings) == 1

    assert ensure_platform_secrets(settings) == created
    assert platform_secrets_key_version(settings) == 2
    store.revoke("platform", "data", 1, "test")
    assert load_platform_secrets(settings) == created


def test_missing_master_key_named(settings: Settings) -> None:
    ensure_platform_secrets(settings)
    master = settings.secrets_dir / "master.key"
    master.unlink()

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "master_key_unavailable"
    assert str(master) in raised.value.message
    assert "REGSANDBOX_MASTER_KEY" in raised.value.message
    assert "regsandbox init" in raised.value.message


def test_ensure_keeps_store_without_master_key(settings: Settings) -> None:
    """A lost master key is not replaced by a new one that could never open the existing store."""
    ensure_platform_secrets(settings)
    (settings.secrets_dir / "master.key").unlink()

    with pytest.raises(ConfigurationError) as raised:
        ensure_platform_secrets(settings)

    assert raised.value.code == "master_key_unavailable"
    assert not (settings.secrets_dir / "master.key").exists()


def test_wrong_master_key_named(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_platform_secrets(settings)
    monkeypatch.setenv("REGSANDBOX_MASTER_KEY", OTHER_MASTER_KEY)

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "master_key_mismatch"
    assert "REGSANDBOX_MASTER_KEY" in raised.value.message


def test_destroyed_version_named(settings: Settings) -> None:
    ensure_platform_secrets(settings)
    store = open_keystore(settings, on_event=None)
    store.rotate("platform", "data")
    store.revoke("platform", "data", 1, "test")
    store.destroy("platform", "data", 1)

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "key_destroyed"
    assert "platform/data/v1" in raised.value.message
    assert str(secrets_file(settings)) in raised.value.message
    assert "regsandbox init" in raised.value.message


def test_revoked_version_named(settings: Settings) -> None:
    ensure_platform_secrets(settings)
    store = open_keystore(settings, on_event=None)
    store.rotate("platform", "data")
    store.revoke("platform", "data", 1, "test")

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "key_revoked"


def test_edited_key_label_rejected(settings: Settings) -> None:
    ensure_platform_secrets(settings)
    open_keystore(settings, on_event=None).rotate("platform", "data")
    document = _document(settings)
    document["key"] = "platform/data/v2"
    secrets_file(settings).write_text(json.dumps(document), encoding="utf-8")

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "SECRETS_CORRUPT"
    assert "platform/data/v2" in raised.value.message


def test_altered_ciphertext_rejected(settings: Settings) -> None:
    ensure_platform_secrets(settings)
    document = _document(settings)
    ciphertext = bytearray(base64.b64decode(document["ciphertext"]))
    ciphertext[0] ^= 1
    document["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode("ascii")
    secrets_file(settings).write_text(json.dumps(document), encoding="utf-8")

    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(settings)

    assert raised.value.code == "SECRETS_CORRUPT"


def test_key_version_without_file(settings: Settings) -> None:
    assert platform_secrets_key_version(settings) is None


def test_smtp_credentials_round_trip(settings: Settings) -> None:
    created = ensure_platform_secrets(settings)

    updated = set_smtp_credentials(settings, "mailer", "p@ss-中文")

    assert updated.smtp_username == "mailer"
    assert "p@ss" not in secrets_file(settings).read_text(encoding="utf-8")
    assert "p@ss" not in repr(updated)
    loaded = load_platform_secrets(settings)
    assert (loaded.smtp_username, loaded.smtp_password) == ("mailer", "p@ss-中文")
    assert loaded.service_token == created.service_token

    cleared = set_smtp_credentials(settings, None, None)
    assert cleared.smtp_username is None
    assert load_platform_secrets(settings) == created


def test_smtp_credentials_need_both(settings: Settings) -> None:
    ensure_platform_secrets(settings)

    with pytest.raises(ConfigurationError) as raised:
        set_smtp_credentials(settings, "mailer", None)

    assert raised.value.code == "SMTP_CREDENTIALS_INVALID"
