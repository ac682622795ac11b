"""Re-identification in the extract package: the token search agrees with the extract builder's tokens."""

from __future__ import annotations

import io
import secrets

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from extracts.masking import TokenDictionary, distinct_text_values, token_dictionary, value_with_token
from extracts.reidentify import ReidentifyError, find_raw_value, published_token_column, token_key_versions
from extracts.warehouse import read_partition_bytes
from regsandbox_core.crypto import TOKEN_SIZE, keyed_token
from regsandbox_core.keystore import KIND_TOKEN
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings


def test_search_matches_dictionary() -> None:
    keys = [secrets.token_bytes(16), secrets.token_bytes(16)]
    con = duckdb.connect()
    con.register("part", pa.table({"amount": pa.array([12.5, None, 7.0, 12.5])}))
    values = distinct_text_values(con, "part", ["amount"])
    dictionary = token_dictionary(con, "part", ["amount"], keys[1]).to_pylist()

    assert sorted(values) == ["12.5", "7.0"]
    for row in dictionary:
        assert value_with_token(values, keys, bytes.fromhex(row["token"])) == (row["value"], 1)
    assert value_with_token(values, keys, secrets.token_bytes(16)) is None


def test_dictionary_added_in_parts_tokenises_each_value_once() -> None:
    key = secrets.token_bytes(16)
    other = secrets.token_bytes(16)
    con = duckdb.connect()
    con.register("first", pa.table({"id": ["A1", "B2", None, "A1"], "card": ["C3", "A1", "D4", None]}))
    con.register("second", pa.table({"id": ["B2", "E5", "甲6"]}))
    # A token computed under another key for E5 is in the cache passed to the first table only.
    cache = {"E5".encode(): bytes(TOKEN_SIZE)}

    fresh = TokenDictionary(key, con)
    fresh.add("first", ["id", "card"])
    fresh.add("second", ["id"])
    fresh.add("second", [])
    table = fresh.table().to_pylist()

    assert sorted(row["value"] for row in table) == ["A1", "B2", "C3", "D4", "E5", "甲6"]
    assert all(row["token"] == keyed_token(key, row["value"]) for row in table)
    assert all(len(row["token"]) == 2 * TOKEN_SIZE for row in table)

    cached = TokenDictionary(other, con, cache)
    cached.add("second", ["id"])
    rows = {row["value"]: row["token"] for row in cached.table().to_pylist()}
    assert rows == {"B2": keyed_token(other, "B2"), "E5": "00" * TOKEN_SIZE, "甲6": keyed_token(other, "甲6")}
    assert cache["B2".encode()] == bytes.fromhex(keyed_token(other, "B2"))
    assert TokenDictionary(key, con).table().num_rows == 0


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
    assert find_raw_value(demo_settings, store, target, secrets.token_hex(16), versions) is None


def test_masked_column_not_searchable(demo_settings: Settings) -> None:
    store = open_keystore(demo_settings)

    with pytest.raises(ReidentifyError) as raised:
        published_token_column(demo_settings, store, "bank_b", "applications", "mobile")

    assert raised.value.code == "COLUMN_NOT_TOKENISED"
    assert "id_number" in raised.value.message
