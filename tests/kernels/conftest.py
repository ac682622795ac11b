"""Fixtures of the sandbox helper tests: demo extracts of bank_a and bank_b in one data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import regsandbox_kernel.extract as extract_module
from extracts.builder import build_extract
from extracts.demo_data import load_demo
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings
from tests.extract_setup import approve_shipped_policy


@pytest.fixture(scope="session")
def kernel_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(data_dir=tmp_path_factory.mktemp("kernel-data"))
    load_demo(settings)
    ensure_platform_keys(settings, ["bank_a", "bank_b"], on_event=None)
    approve_shipped_policy(settings)
    build_extract(settings, "bank_a")
    build_extract(settings, "bank_b")
    return settings


@pytest.fixture
def bank_a_dir(kernel_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the helper library at bank_a's extract, as the spawner does, and close its connection afterwards."""
    folder = kernel_settings.extracts_dir / "bank_a"
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(folder))
    monkeypatch.setenv("REGSANDBOX_INSTITUTION", "bank_a")
    yield folder
    if extract_module._default_connection is not None:
        extract_module._default_connection.close()
    extract_module._default_connection = None
    extract_module._default_connection_dir = None
