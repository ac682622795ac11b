"""Re-identification in the extract package: the token search agrees with the extract builder's tokens."""

from __future__ import annotations

import io
import secrets

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from extracts.masking import distinct_text_values, token_dictionary, value_with_token
from extracts.reidentify import ReidentifyError, find_raw_value, published_token_column, token_key_versions
from extracts.warehouse import read_partition_bytes
from regsandbox_core.keystore import KIND_TOKEN
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings


def test_search_matches_dictionary() -> None:
    keys = [secrets.token_bytes(32), secrets.token_bytes(32)]
    con = duckdb.connect()
    con.register("part", pa.table({"amount": pa.array([12.5, None, 7.0, 12.5])}))
    values = distinct_text_values(con, "part", ["amount"])
    dictionary = token_dictionary(con, "part", ["amount"], keys[1]).to_pylist()

    assert sorted(values) == ["12.5", "7.0"]
    for row in dictionary:
        assert value_with_token(values, keys, bytes.fromhex(row["token"])) == (row["value"], 1)
    assert value_with_token(values, keys, secrets.token_bytes(32)) is None


def test_demo_extract_token_found(demo_settings: Settings) -> None:
    store = open_keystore(demo_settings)
    raw = pl.read_parquet(io.BytesIO(read_partition_bytes(demo_settings, store, "bank_b")))
    extract = pl.read_parquet(demo_settings.extracts_dir / "bank_b" / "applications.parquet")
    target = published_token_column(demo_settings, store, "bank_b", "applications", "id_number")
    versions = token_key_versions(store, "bank_b", target.manifest_key_version)
    tokens = set(extract["id_number"].to_list())

    found = [find_raw_value(demo_settings, store, target, token, versions) for token in sorted(tokens)[:3]]

    assert target.source_kind == "demo"
    assert [item.key_version for item in found] == [store.current("bank_b", KIND_TOKEN).version] * 3
    assert {item.value for item in found} <= set(raw["id_number"].to_list())
    assert find_raw_value(demo_settings, store, target, secrets.token_hex(32), versions) is None


def test_masked_column_not_searchable(demo_settings: Settings) -> None:
    store = open_keystore(demo_settings)

    with pytest.raises(ReidentifyError) as raised:
        published_token_column(demo_settings, store, "bank_b", "applications", "mobile")

    assert raised.value.code == "COLUMN_NOT_TOKENISED"
    assert "id_number" in raised.value.message
