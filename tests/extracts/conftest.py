"""Fixtures of the extract tests: one demo warehouse per session, copied for tests that change it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from extracts.builder import build_extract
from extracts.demo_data import DEMO_INSTITUTIONS, load_demo
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings


@pytest.fixture(scope="session")
def demo_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of a data dir holding the demo warehouse, its key store and the extracts of all three banks."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("extracts-data"))
    load_demo(settings)
    ensure_platform_keys(settings, list(DEMO_INSTITUTIONS), on_event=None)
    for code in DEMO_INSTITUTIONS:
        build_extract(settings, code)
    return settings


@pytest.fixture
def bare_settings(demo_settings: Settings, tmp_path: Path) -> Settings:
    """Settings of a new data dir with a copy of the demo warehouse and no extracts, master key or key store."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copytree(demo_settings.warehouse_dir, data_dir / "warehouse")
    return Settings(data_dir=data_dir)


@pytest.fixture
def fresh_settings(bare_settings: Settings) -> Settings:
    """Settings of a new data dir with a copy of the demo warehouse, a new master key and key store, no extracts."""
    ensure_platform_keys(bare_settings, list(DEMO_INSTITUTIONS), on_event=None)
    return bare_settings
