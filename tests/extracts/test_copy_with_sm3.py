"""The masked table's COPY writes through a named pipe and hashes the file on the way."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from extracts.masking import copy_with_sm3, parquet_options
from regsandbox_core.crypto import sm3_file


@pytest.fixture
def con():
    connection = duckdb.connect()
    yield connection
    connection.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_digest_is_that_of_the_written_file(con, tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    query = "SELECT i, 'value ' || i AS text FROM range(300000) AS t(i)"

    digest = copy_with_sm3(con, query, target, parquet_options({"note": "kept"}), tmp_path)

    assert digest == sm3_file(target)
    assert con.sql(f"SELECT count(*), sum(i) FROM read_parquet('{target}')").fetchall() == [(300000, 44999850000)]
    metadata = con.sql(f"SELECT value FROM parquet_kv_metadata('{target}') WHERE key = 'note'").fetchall()
    assert metadata == [(b"kept",)]
    assert _leftovers(tmp_path) == ["table.parquet"]


@pytest.mark.parametrize("query", [
    # Fails while DuckDB writes rows (after it opened the pipe) ...
    "SELECT CAST(CASE WHEN i < 200000 THEN '1' ELSE 'x' END AS INTEGER) AS n FROM range(250000) AS t(i)",
    # ... and before it opens the pipe.
    "SELECT no_such_column FROM range(10)",
])
def test_failed_copy_leaves_no_file(con, tmp_path: Path, query: str) -> None:
    target = tmp_path / "table.parquet"
    threads = threading.active_count()

    with pytest.raises(duckdb.Error):
        copy_with_sm3(con, query, target, parquet_options(), tmp_path)

    assert _leftovers(tmp_path) == []
    assert threading.active_count() == threads


def test_unwritable_target_raises_and_does_not_block(con, tmp_path: Path) -> None:
    target = tmp_path / "missing-folder" / "table.parquet"
    threads = threading.active_count()

    with pytest.raises((OSError, duckdb.Error)):
        copy_with_sm3(con, "SELECT i FROM range(500000) AS t(i)", target, parquet_options(), tmp_path)

    assert _leftovers(tmp_path) == []
    assert threading.active_count() == threads
