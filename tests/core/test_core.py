"""Shared core: settings reference, SM3 vectors, tokens and private files."""

from __future__ import annotations

import stat

import pytest

from regsandbox_core import crypto
from regsandbox_core.errors import ConfigurationError
from regsandbox_core.platform_keys import ensure_tokenisation_key, tokenisation_key_path
from regsandbox_core.secrets import ensure_platform_secrets, load_platform_secrets, mlflow_password
from regsandbox_core.settings import PROJECT_ROOT, Settings
from regsandbox_core.settings_doc import render


def test_settings_doc_is_current():
    assert (PROJECT_ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == render()


def test_every_setting_is_described():
    assert all(field.description for field in Settings.model_fields.values())


def test_sm3_of_abc_matches_gbt_32905():
    assert crypto.sm3_hex(b"abc") == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"


def test_sm3_file_matches_sm3_of_bytes(tmp_path):
    data = bytes(range(256)) * 10_000
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert crypto.sm3_file(path) == crypto.sm3_hex(data)


def test_keyed_token_stable_per_key_unlinkable_across():
    key_a, key_b = b"a" * 32, b"b" * 32
    assert crypto.keyed_token(key_a, "110101199003077777") == crypto.keyed_token(key_a, "110101199003077777")
    assert crypto.keyed_token(key_a, "110101199003077777") != crypto.keyed_token(key_b, "110101199003077777")


def test_secrets_created_once_with_mode_0600(tmp_path):
    settings = Settings(data_dir=tmp_path)
    first = ensure_platform_secrets(settings)
    second = ensure_platform_secrets(settings)
    assert first == second
    assert stat.S_IMODE((tmp_path / "secrets" / "platform.enc.json").stat().st_mode) == 0o600
    assert mlflow_password(first, "modeller_a") != mlflow_password(first, "modeller_b")


def test_missing_secrets_raise_chinese_message(tmp_path):
    with pytest.raises(ConfigurationError) as raised:
        load_platform_secrets(Settings(data_dir=tmp_path))
    assert raised.value.code == "SECRETS_MISSING"
    assert "regsandbox init" in raised.value.message


def test_tokenisation_key_per_institution(tmp_path):
    settings = Settings(data_dir=tmp_path)
    key_a = ensure_tokenisation_key(settings, "bank_a")
    assert ensure_tokenisation_key(settings, "bank_a") == key_a
    assert ensure_tokenisation_key(settings, "bank_b") != key_a
    assert stat.S_IMODE(tokenisation_key_path(settings, "bank_a").stat().st_mode) == 0o600


def test_tokenisation_key_rejects_path_in_code(tmp_path):
    with pytest.raises(ValueError):
        tokenisation_key_path(Settings(data_dir=tmp_path), "../bank_b")
