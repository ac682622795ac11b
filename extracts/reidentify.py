"""Re-identification (令牌反查): find the raw warehouse value behind a token of an institution's extract.

A token is HMAC-SM3 of a value under one version of the institution's tokenisation key, so the
value cannot be computed back from it. :func:`find_raw_value` instead recomputes the tokens of
the distinct values of the column in the warehouse, read as the extract builder reads them
(:func:`extracts.masking.distinct_text_values`), and stops at the first that equals the given token.

The published extract's signed manifest decides what may be looked up: the table must be in it
and the column must have the ``token`` treatment there (:func:`published_token_column`). The key
versions tried are the one the manifest names first, then the institution's other usable token key
versions, newest first (:func:`token_key_versions`). Revoked and destroyed versions cannot be used,
so a token made under one of them is not found.

Plaintext stays in memory: each partition is decrypted into a ``BytesIO``, only the one column is
read into Arrow, and DuckDB runs in memory with no temporary directory and no file access. This
module writes no audit events and checks no permission. :mod:`admin_api.reidentification` does both.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from extracts.masking import distinct_text_values, value_with_token
from extracts.publish import current_build
from extracts.sources import SOURCE_DEMO, SOURCE_INTAKE, extract_table_name, intake_tables
from extracts.warehouse import read_partition_bytes
from intake.warehouse import partition_associated_data
from regsandbox_core.documents import decrypt_document
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KIND_TOKEN, STATE_ACTIVE, STATE_DECRYPT_ONLY, KeyStore, KeyVersion
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, SignedObjectInvalid, verify_file

__all__ = [
    "MAX_KEY_VERSIONS",
    "RawValue",
    "ReidentifyError",
    "TokenColumn",
    "find_raw_value",
    "published_token_column",
    "token_key_versions",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MAX_KEY_VERSIONS = 10
"""Maximum number of token key versions one lookup tries; each version hashes every distinct value once more."""
DUCKDB_MEMORY_LIMIT = "512MB"
"""Memory limit of the lookup's DuckDB connection. Nothing spills to disk, so a larger partition fails."""


class ReidentifyError(RegsandboxError):
    """A re-identification request that names something the published extract does not tokenise."""

    status = 422


@dataclass(frozen=True)
class TokenColumn:
    """A token column of a published extract table, and where its warehouse values come from."""

    institution: str
    table: str
    """Extract table name, e.g. ``applications`` or ``east_grkhxxb``."""
    source_kind: str
    """``intake`` (accepted report data) or ``demo``."""
    source_table: str
    """Template code of an intake table, or ``applications``."""
    column: str
    manifest_key_version: int
    build_id: str


@dataclass(frozen=True)
class RawValue:
    """The raw value behind a token, the key version that produced the token and the period it was found in."""

    value: str = field(repr=False)
    key_version: int
    period: str | None


def _read_manifest(settings: Settings, keystore: KeyStore, institution: str) -> dict:
    folder = current_build(settings, institution)
    if folder is None:
        raise ReidentifyError(
            "EXTRACT_NOT_PUBLISHED",
            f"机构 {institution} 还没有已发布的数据提取，没有可反查的令牌。请确认机构代码，或先生成该机构的数据提取。",
            status=409)
    path = folder / MANIFEST_NAME
    try:
        verify_file(path, keystore)
        return json.loads(path.read_text("utf-8"))
    except (SignatureInvalid, SignedObjectInvalid, OSError, ValueError) as error:
        logger.warning("extract manifest %s of %s does not verify: %s", path, institution, type(error).__name__)
        raise ReidentifyError(
            "EXTRACT_MANIFEST_INVALID",
            f"机构 {institution} 已发布数据提取的清单 {path} 签名验证失败或无法读取，不能据此反查。"
            "请联系安全管理员核查该数据提取，并重新生成。", status=500) from error


def _find_table(manifest: dict, institution: str, table: str) -> dict:
    names = {table, extract_table_name(table)}
    tables = manifest.get("tables", [])
    for entry in tables:
        if entry.get("name") in names or entry.get("source", {}).get("table") == table:
            return entry
    listed = "、".join(str(entry.get("name")) for entry in tables) or "无"
    raise ReidentifyError(
        "REIDENTIFY_TABLE_UNKNOWN",
        f"机构 {institution} 的数据提取中没有表“{table[:64]}”。可选的表：{listed}。"
        "表名可填数据提取中的表名或报表模板代码。", status=404)


def published_token_column(settings: Settings, keystore: KeyStore, institution: str, table: str,
                           column: str) -> TokenColumn:
    """Return the token column ``column`` of ``table`` in the institution's published extract.

    Raises :class:`ReidentifyError`: 409 ``EXTRACT_NOT_PUBLISHED``, 500 ``EXTRACT_MANIFEST_INVALID``
    when the manifest's signature does not verify, 404 ``REIDENTIFY_TABLE_UNKNOWN``, and 422
    ``COLUMN_NOT_TOKENISED`` when the column is not in the table or has another treatment.
    """
    manifest = _read_manifest(settings, keystore, institution)
    entry = _find_table(manifest, institution, table)
    tokenised = [item["name"] for item in entry.get("columns", []) if item.get("treatment") == "token"]
    if column not in tokenised:
        raise ReidentifyError(
            "COLUMN_NOT_TOKENISED",
            f"数据提取表 {entry['name']} 的字段“{column[:64]}”不是令牌化字段，无法反查。"
            f"该表的令牌化字段有：{'、'.join(tokenised) or '无'}。")
    source = entry.get("source", {})
    return TokenColumn(institution=institution, table=entry["name"], source_kind=source.get("kind", SOURCE_INTAKE),
                       source_table=source.get("table", entry["name"]), column=column,
                       manifest_key_version=int(manifest.get("token_key_version") or 0),
                       build_id=str(manifest.get("build_id", "")))


def token_key_versions(keystore: KeyStore, institution: str, preferred: int,
                       only: int | None = None) -> list[KeyVersion]:
    """Return the usable token key versions of the institution: ``preferred`` first, then the others newest first.

    Usable means active or decrypt_only. At most :data:`MAX_KEY_VERSIONS` are returned. With
    ``only``, just that version is returned, and :class:`ReidentifyError` ``KEY_VERSION_UNUSABLE``
    is raised when it is not usable.
    """
    usable = [entry["version"] for entry in keystore.metadata()["keys"]
              if entry["owner"] == institution and entry["kind"] == KIND_TOKEN
              and entry["state"] in (STATE_ACTIVE, STATE_DECRYPT_ONLY)]
    if only is not None:
        if only not in usable:
            listed = "、".join(f"第 {version} 版" for version in sorted(usable)) or "无"
            raise ReidentifyError(
                "KEY_VERSION_UNUSABLE",
                f"机构 {institution} 的令牌化密钥第 {only} 版不存在，或已吊销、销毁，不能用于反查。"
                f"可用的版本：{listed}。不填密钥版本时会依次尝试全部可用版本。")
        return [keystore.get(institution, KIND_TOKEN, only)]
    ordered = sorted(usable, key=lambda version: (version != preferred, -version))[:MAX_KEY_VERSIONS]
    return [keystore.get(institution, KIND_TOKEN, version) for version in ordered]


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("SET temp_directory=''")
    con.execute(f"SET memory_limit='{DUCKDB_MEMORY_LIMIT}'")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


def _column_of(parquet: io.BytesIO, column: str) -> pa.Table | None:
    """Read one column of decrypted Parquet bytes; None when this partition has no such column."""
    if column not in pq.read_schema(parquet).names:
        return None
    parquet.seek(0)
    return pq.read_table(parquet, columns=[column])


def _partitions(settings: Settings, keystore: KeyStore, target: TokenColumn) -> Iterator[tuple[str | None, pa.Table]]:
    """Yield (period, the column's values) of each warehouse partition of the table, decrypted in memory."""
    if target.source_kind == SOURCE_DEMO:
        buffer = io.BytesIO(read_partition_bytes(settings, keystore, target.institution))
        values = _column_of(buffer, target.column)
        buffer.close()
        if values is not None:
            yield None, values
        return
    for table in intake_tables(settings, target.institution):
        if table.catalog_table != target.source_table:
            continue
        for partition in table.partitions:
            buffer = io.BytesIO()
            try:
                decrypt_document(keystore, target.institution, partition.path, buffer,
                                 partition_associated_data(table.catalog_table, target.institution,
                                                           partition.period or ""))
                buffer.seek(0)
                values = _column_of(buffer, target.column)
            finally:
                buffer.close()
            if values is not None:
                yield partition.period, values


def find_raw_value(settings: Settings, keystore: KeyStore, target: TokenColumn, token: str,
                   key_versions: list[KeyVersion]) -> RawValue | None:
    """Return the raw value whose token under one of ``key_versions`` is ``token``, or None when none matches.

    ``token`` is the 16 bytes of a token (32 lower-case hex digits in an extract). Partitions are read one at a time, and the search stops
    at the first match. A partition that does not decrypt raises the key store's or stream's error.

    NOTE: each distinct value costs one HMAC-SM3 call from Python per key version. A token that
    matches nothing took 3.2 to 3.3 s for 1,000,000 distinct values on 2 shared cores
    (benchmarks/data_quality.py), above the 2 s aimed at for operations.
    """
    digest = bytes.fromhex(token)
    keys = [key.key for key in key_versions]
    with _connect() as con:
        for period, values in _partitions(settings, keystore, target):
            con.register("part", values)
            try:
                distinct = distinct_text_values(con, "part", [target.column])
            finally:
                con.unregister("part")
            match = value_with_token(distinct, keys, digest)
            if match is not None:
                return RawValue(match[0], key_versions[match[1]].version, period)
    return None
