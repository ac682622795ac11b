"""Fixtures of the extract tests: one demo warehouse per session, copied for tests that change it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from extracts.builder import build_extract
from extracts.demo_data import DEMO_INSTITUTIONS, load_demo
from extracts.watermark import KeyedBits
from extracts.warehouse import (
    make_private_dirs,
    migrate_plaintext_partition,
    plaintext_partition_file,
    read_partition_bytes,
)
from regsandbox_core.crypto import keyed_token
from regsandbox_core.files import write_private_file
from regsandbox_core.platform_keys import ensure_platform_keys, open_keystore
from regsandbox_core.settings import Settings
from tests.extract_setup import approve_shipped_policy


@pytest.fixture(scope="session")
def demo_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of a data dir holding the demo warehouse, its key store and the extracts of all three banks."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("extracts-data"))
    load_demo(settings)
    ensure_platform_keys(settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(settings)
    for code in DEMO_INSTITUTIONS:
        build_extract(settings, code)
    return settings


@pytest.fixture(scope="session")
def demo_parquet(demo_settings: Settings) -> dict[str, bytes]:
    """Decrypted Parquet bytes of each demo partition."""
    store = open_keystore(demo_settings)
    return {code: read_partition_bytes(demo_settings, store, code) for code in DEMO_INSTITUTIONS}


@pytest.fixture
def bare_settings(demo_parquet: dict[str, bytes], tmp_path: Path) -> Settings:
    """Settings of a data dir from before the key store: plaintext demo partitions, no master key, key store or extracts."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = Settings(data_dir=data_dir)
    for code, parquet in demo_parquet.items():
        path = plaintext_partition_file(settings, code)
        make_private_dirs(path.parent, data_dir)
        write_private_file(path, parquet)
    return settings


@pytest.fixture
def fresh_settings(bare_settings: Settings) -> Settings:
    """Settings of a new data dir with a new master key and key store, the demo warehouse encrypted under it, no extracts."""
    store = ensure_platform_keys(bare_settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(bare_settings)
    for code in DEMO_INSTITUTIONS:
        assert migrate_plaintext_partition(bare_settings, store, code)
    return bare_settings


def _surname_mask(name: str) -> str:
    kept = 2 if name[:2] in ("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙",
                               "宇文", "司徒", "夏侯", "令狐", "端木", "独孤", "南宫", "西门", "万俟", "闻人") else 1
    return name[:kept] + "*" * (len(name) - kept) if len(name) > kept else "*" * len(name)


def masked_demo(raw: pl.DataFrame, token_key: bytes) -> pl.DataFrame:
    """Apply the default policy to demo rows in plain Python, as an independent check of the SQL.

    The policy declares ``age_in_years`` a quasi-identifier with two bands split at 35.
    """
    return raw.with_columns(
        pl.Series("name", [_surname_mask(value) for value in raw["name"].to_list()]),
        pl.Series("id_number", [keyed_token(token_key, value) for value in raw["id_number"].to_list()]),
        pl.Series("mobile", [value[:3] + "*" * (len(value) - 7) + value[-4:] for value in raw["mobile"].to_list()]),
        pl.Series("age_in_years", ["35 岁以下" if age < 35 else "35 岁及以上" for age in raw["age_in_years"].to_list()]),
    )


def watermarked(expected: pl.DataFrame, settings: Settings, folder: Path) -> pl.DataFrame:
    """Apply the data mark that the manifest in ``folder`` declares to masked demo rows, in plain Python.

    The carrier digit pair is kept and its parity set to the keyed bit of the row's key value, so
    a masked table equals ``watermarked(masked_demo(raw, key), ...)`` only if the SQL marked it.
    """
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    (table,) = manifest["tables"]
    mark = table["watermark"]
    assert mark["scale"] == 0, mark
    bits = KeyedBits(open_keystore(settings).current("platform", "token"))
    carrier, keys = expected[mark["carrier"]].to_list(), expected[mark["key_column"]].to_list()
    marked = [value - value % 2 + bits.bit(manifest["institution"], mark["id"], key) for value, key in zip(carrier, keys)]
    return expected.with_columns(pl.Series(mark["carrier"], marked, dtype=expected[mark["carrier"]].dtype))
