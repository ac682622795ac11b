"""Watermarks of the masked extracts, and the identification of a leaked file's source.

Every published build of an institution's extract gets a random watermark id (``wm1-`` and 16 hex
digits). The manifest records it under ``watermark``, and every table file that the build writes
carries it. A platform-side registry maps the id to the institution, the build id and time, the
watermark key version, and the tables with their SM3 digests.

Each table file written by a build carries the id in two layers:

1. Parquet key-value metadata ``regsandbox.watermark`` (JSON with ``scheme``, ``id``, ``table``).
   It is exact but is lost when the table is exported to CSV or written again by another tool.
2. A mark in the data, which survives a CSV or Parquet re-export, reordered columns and a subset
   of the rows. It needs two columns of the table: a *row key* and a *carrier*.

   - The row key is a column the mark never changes: the first token column (HMAC-SM3 of an
     identifier, unchanged by a re-export), or else the text or integer column with the most
     distinct values. Rows with the same key value get the same bit.
   - The carrier is a kept column of kind ``amount`` whose values are plain decimal numerals
     (integer, DECIMAL, DOUBLE or text). Its scale ``s`` is the smallest number of decimals among
     its values, so every value has a digit at position ``10^-s``.
   - For each key value ``x`` a keyed bit is derived with HMAC-SM3 under the watermark key ``K``:
     ``HMAC(K, "role" | x)`` puts the key in one of two halves. In the first half the bit is
     ``HMAC(K, "institution" | code | x)`` and depends on the institution only. In the second
     half it is ``HMAC(K, "build" | watermark id | x)`` and names the build.
   - The digit of the carrier at position ``10^-s`` (of the absolute value) is set to the bit's
     parity within its pair {0,1}, {2,3}, ..., {8,9}: an even digit becomes odd or an odd digit
     even only when the parity differs from the bit. No carry happens and the sign is kept.

   ``K`` is ``HMAC-SM3(platform/token key, "regsandbox-watermark-key/1")``, so the platform's
   HMAC-SM3 key is not used directly and no other use of it can produce the same bits.

Distortion: only the carrier column changes. About half of its values move by exactly one unit
of the scale (for example 1 yuan in an integer amount, 0.01 in a two-decimal amount) and the
others are unchanged. A value moves up when its digit was even and down when it was odd, so the
column's mean shifts by at most half a unit, and by about zero when even and odd digits are
equally common. A carrier is chosen only when one unit is at most 0.1 % of the column's median
absolute value, so a value at or above the median moves by at most 0.1 %. Key columns, tokens
and every other column stay as masked, so joins within the institution are unaffected. What can
change: equality with the reported value, sums that reconcile with a reported total (each row
may differ by one unit), and a value that sits exactly on a band or split boundary may cross it.
For modelling it is noise of at most one unit against a median of at least 1,000 units.

Identification (:func:`identify_file`) reads the metadata when present and always tests the data
mark against the registry. For each institution in the registry it counts the key values of the
first half whose carrier parity equals the expected bit. For an unmarked file or a file of
another institution each key value matches with probability 1/2, independently, so the
probability of ``m`` or more matches out of ``n`` by chance is the binomial tail. That tail,
multiplied by the number of candidates tried, is the reported chance. A source is named when at
least 80 % of the key values match and the chance is at most 1e-6. The build is then found the
same way among that institution's watermark ids, with the second half of the keys.

Incremental builds: a table that is hard-linked from the previous build keeps the watermark id
of the build that wrote it, and its manifest entry (copied with the table) records that id. So the data
mark of a reused table names the build that wrote it, and the registry lists every later build
that published the same table. The institution is the same in both. A table of which only some
periods were masked again is marked again as a whole with the new build's id, because the mark
is set from the digit pair and not added to the previous mark.

Limits: a table without an eligible carrier (no kept amount column, or amounts too small for a
0.1 % change) carries the metadata layer only, and the manifest says so. Anyone who knows this
scheme and holds two builds of one institution can find the carrier by comparing them and
randomise its last digit, which removes the mark at the cost of the same distortion. The mark
resists re-exports and subsets, not a deliberate attack.

Key rotation: each registry entry records the ``platform/token`` version that marked its build,
and identification uses that version while it is active or decrypt_only. A revoked or destroyed
version leaves the builds it marked identifiable by their metadata only. Rotation does not
rewrite reused tables.

The registry lives in ``<data_dir>/warehouse/watermarks/<institution>.json`` (folder 0700, files
0600, written atomically), beside the raw warehouse that sandbox users cannot read. The builder
writes an institution's file while it holds that institution's build lock.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from extracts.masking import CarrierMark, parquet_options, quote_identifier, quote_literal
from regsandbox_core.crypto import hmac_sm3
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_output, atomic_path, make_private_dirs
from regsandbox_core.keystore import KIND_TOKEN, PLATFORM_OWNER, KeyStore, KeyStoreError, KeyVersion, NoActiveKey
from regsandbox_core.settings import Settings

__all__ = [
    "BuildWatermark",
    "Identification",
    "IdentifyInputInvalid",
    "METADATA_KEY",
    "SCHEME",
    "WatermarkKeyMissing",
    "WatermarkRegistryInvalid",
    "active_watermark_key",
    "identify_file",
    "register_build",
    "registry_dir",
]

logger = logging.getLogger(__name__)

SCHEME = "regsandbox-watermark/1"
METADATA_KEY = "regsandbox.watermark"
REGISTRY_FORMAT = "regsandbox-watermark-registry/1"
REGISTRY_DIR_NAME = "watermarks"
WATERMARK_ID = re.compile(r"^wm1-[0-9a-f]{16}$")
_KEY_CONTEXT = b"regsandbox-watermark-key/1"
_BIT_COLUMN = "_watermark_bit"
_BITS_TABLE = "_watermark_bits"
_NUMERAL = r"^-?[0-9]+(\.[0-9]+)?$"
_INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                  "UBIGINT", "UHUGEINT")

MAX_SCALE = 6
"""Largest carrier scale in decimals. A column whose values all have more decimals is marked at 10^-6."""
MIN_MEDIAN_UNITS = 1000
"""A carrier's median absolute value must be at least this many units of its scale (one unit <= 0.1 %)."""
MIN_MATCH_RATE = 0.8
"""Share of key values whose carrier parity must match the expected bit to name a source."""
MAX_CHANCE = 1e-6
"""Largest probability, over all candidates tried, that an unmarked file matches as well by chance."""
MAX_DETECTION_ROWS = 500_000
"""Rows read from a file per (key, carrier) pair when identifying it."""
MAX_DETECTION_KEYS = 4096
"""Key values used per half when identifying. More would only lower a chance that is already below 1e-300."""


class WatermarkKeyMissing(RegsandboxError):
    """The key store has no active platform HMAC-SM3 key (``platform/token``) to derive the watermark key from."""

    status = 409


class WatermarkRegistryInvalid(RegsandboxError):
    """A registry file cannot be read or is not in the registry format."""

    status = 500


class WatermarkColumnReserved(RegsandboxError):
    """A table has a column whose name the watermark step uses internally."""

    status = 500


class IdentifyInputInvalid(RegsandboxError):
    """The file to identify does not exist or is neither Parquet nor CSV."""


# --- keys and bits --------------------------------------------------------------------------------


def active_watermark_key(keystore: KeyStore) -> KeyVersion:
    """Return the active ``platform/token`` version, or raise WatermarkKeyMissing naming the fix."""
    try:
        return keystore.current(PLATFORM_OWNER, KIND_TOKEN)
    except NoActiveKey:
        raise WatermarkKeyMissing(
            "WATERMARK_KEY_MISSING",
            f"密钥库中没有启用状态的平台水印密钥（{PLATFORM_OWNER}/{KIND_TOKEN}），无法为数据提取加水印，"
            "未发布新的数据提取，原有提取保持不变。请运行 `regsandbox init` 补齐密钥；若该密钥已被吊销，"
            "请由密钥管理员生成并启用新版本。",
        ) from None


class KeyedBits:
    """The keyed role and bits of row keys under one watermark key version."""

    def __init__(self, key: KeyVersion) -> None:
        self.label = key.label
        self._mac = crypto_hmac.HMAC(hmac_sm3(key.key, _KEY_CONTEXT), hashes.SM3())

    def _first_byte(self, *parts: str) -> int:
        mac = self._mac.copy()
        mac.update("\x00".join(parts).encode("utf-8"))
        return mac.finalize()[0]

    def role(self, key_value: str) -> int:
        """Return 0 for a key that carries the institution bit, 1 for one that carries the build bit."""
        return self._first_byte("role", key_value) & 1

    def institution_bit(self, institution: str, key_value: str) -> int:
        return self._first_byte("institution", institution, key_value) & 1

    def build_bit(self, watermark_id: str, key_value: str) -> int:
        return self._first_byte("build", watermark_id, key_value) & 1

    def bit(self, institution: str, watermark_id: str, key_value: str) -> int:
        """Return the bit that the carrier of rows with this key value holds."""
        if self.role(key_value) == 0:
            return self.institution_bit(institution, key_value)
        return self.build_bit(watermark_id, key_value)

    def bits(self, institution: str, watermark_id: str, key_values: Iterable[bytes]) -> bytes:
        """Return :meth:`bit` of each UTF-8 key value, one byte each, with less Python work per value."""
        copy = self._mac.copy
        role_prefix = b"role\x00"
        prefixes = (f"institution\x00{institution}\x00".encode("utf-8"), f"build\x00{watermark_id}\x00".encode("utf-8"))
        result = bytearray()
        append = result.append
        for value in key_values:
            role = copy()
            role.update(role_prefix + value)
            mac = copy()
            mac.update(prefixes[role.finalize()[0] & 1] + value)
            append(mac.finalize()[0] & 1)
        return bytes(result)


def carrier_parity(text: str, scale: int) -> int | None:
    """Return the parity of the digit at ``10^-scale`` of a numeral's absolute value, or None for a non-numeral.

    Thousands separators and surrounding spaces are ignored, so ``"1,234.50"`` and ``1234.5``
    (a float read back from a CSV) give the same parity at scale 2.
    """
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return int(abs(value).scaleb(scale)) % 2


# --- marking one table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CarrierSpec:
    """Columns and scale of a table's data mark."""

    key_column: str
    carrier: str
    scale: int

    def manifest_entry(self) -> dict:
        unit = "1" if self.scale == 0 else f"0.{'0' * (self.scale - 1)}1"
        return {"key_column": self.key_column, "carrier": self.carrier, "scale": self.scale, "max_change": unit}


@dataclass(frozen=True)
class BuildWatermark:
    """The watermark of one build of one institution's extract."""

    id: str
    institution: str
    build_id: str
    key: KeyVersion = field(repr=False)

    @classmethod
    def new(cls, institution: str, build_id: str, key: KeyVersion) -> BuildWatermark:
        return cls(f"wm1-{secrets.token_hex(8)}", institution, build_id, key)

    def manifest_entry(self) -> dict:
        return {"id": self.id, "scheme": SCHEME}

    def parquet_metadata(self, table: str) -> dict[str, str]:
        """Return the Parquet key-value metadata of a table file: ``regsandbox.watermark`` as JSON."""
        return {METADATA_KEY: json.dumps({"scheme": SCHEME, "id": self.id, "table": table}, sort_keys=True)}

    def mark_table(self, path: Path, table: str, columns: Sequence[dict], *, data_mark: bool = True) -> dict:
        """Give the Parquet file ``path`` both layers of this watermark and return the table's manifest entry.

        With ``data_mark`` False only the metadata layer is written (the cross-institution feature
        table, whose aggregates are published exactly).

        ``columns`` are the manifest entries of the table's columns (name, class, treatment). The
        carrier is chosen among the kept ``amount`` columns, and the key among the token columns
        first. With a carrier the file is rewritten with the data mark and the metadata. Without
        one it is rewritten only if its metadata is not :meth:`parquet_metadata` yet, because the
        builder writes that metadata when it masks the table. Files are replaced atomically.
        Raises WatermarkColumnReserved and OSError.
        """
        metadata = self.parquet_metadata(table)
        con = duckdb.connect(":memory:")
        try:
            con.sql(f"CREATE VIEW source AS SELECT * FROM read_parquet({quote_literal(str(path))})")
            types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE source)").fetchall())
            if _BIT_COLUMN in types:
                raise WatermarkColumnReserved(
                    "WATERMARK_COLUMN_RESERVED",
                    f"表 {table} 含有平台保留的列名 {_BIT_COLUMN}，无法生成数据提取。请联系平台管理员调整报表模板字段代码。",
                )
            spec = _choose_spec(con, types, columns) if data_mark else None
            if spec is not None:
                con.register(_BITS_TABLE, self._bits_table(con, spec))
                _rewrite(con, path, _marked_sql(spec, types[spec.carrier]), metadata)
            elif not _has_metadata(path, metadata):
                _rewrite(con, path, "SELECT * FROM source", metadata)
        finally:
            con.close()

        if spec is None:
            # Expected for many tables (no kept amount column), so not a warning.
            logger.info("extract table %s of %s has no watermark carrier, so only the Parquet metadata is marked",
                        table, self.institution)
            note = ("表中没有可承载数据内嵌水印的金额列，仅在 Parquet 元数据中标记" if data_mark
                    else "该表的数值须保持精确，仅在 Parquet 元数据中标记")
            return {"id": self.id, "carrier": None, "note": note}
        logger.info("marked extract table %s of %s with watermark %s (carrier %s, key %s, scale %s)", table,
                    self.institution, self.id, spec.carrier, spec.key_column, spec.scale)
        return {"id": self.id, **spec.manifest_entry()}

    def plan_token_mark(self, con: duckdb.DuckDBPyConnection, relation: str,
                        columns: Sequence[dict]) -> tuple[CarrierSpec, CarrierMark] | None:
        """Choose the carrier and key of a table before it is written from ``relation``, its unmasked rows.

        A kept carrier has the same values in ``relation`` as in the table. A token column has as
        many distinct values as its source column. So both are chosen as :meth:`mark_table` would
        choose them in the written file. Returns None when the key is not a token column, which
        happens only when the table has none: the caller then marks the written file with
        :meth:`mark_table`. The bits come from the token table's ``bit`` column (:meth:`token_bits`).
        """
        types = dict(con.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {relation})").fetchall())
        if _BIT_COLUMN in types:
            raise WatermarkColumnReserved(
                "WATERMARK_COLUMN_RESERVED",
                f"数据表含有平台保留的列名 {_BIT_COLUMN}，无法生成数据提取。请联系平台管理员调整报表模板字段代码。",
            )
        tokens = {column["name"] for column in columns if column.get("treatment") == "token"}
        if not tokens:
            return None
        # A token column is text in the written table, whatever its source type.
        types.update({name: "VARCHAR" for name in tokens if name in types})
        carrier, scale = _choose_carrier(con, types, columns, relation)
        if carrier is None:
            return None
        key = _choose_key(con, types, columns, carrier, relation)
        if key not in tokens:
            return None
        carrier_type = types[carrier]
        return CarrierSpec(key, carrier, scale), CarrierMark(
            key, carrier, lambda value: _mark_helpers(value, scale),
            lambda value, bit, helpers: _marked_value(value, carrier_type, bit, *helpers))

    def token_bits(self, tokens: pa.Array) -> pa.Array:
        """Return the bit (int8) of each token as a row key, for the ``bit`` column of the token table."""
        bits = KeyedBits(self.key).bits(self.institution, self.id, tokens.cast(pa.binary()).to_pylist())
        return pa.array(np.frombuffer(bits, dtype=np.int8))

    def applied_entry(self, table: str, spec: CarrierSpec) -> dict:
        """Return the manifest entry of a table written with this watermark's data mark by ``spec``."""
        logger.info("marked extract table %s of %s with watermark %s while masking it (carrier %s, key %s, scale %s)",
                    table, self.institution, self.id, spec.carrier, spec.key_column, spec.scale)
        return {"id": self.id, **spec.manifest_entry()}

    def _bits_table(self, con: duckdb.DuckDBPyConnection, spec: CarrierSpec) -> pa.Table:
        """Return the (key, bit) table of every distinct key value of rows with a carrier value."""
        key, carrier = quote_identifier(spec.key_column), quote_identifier(spec.carrier)
        values = con.sql(f"SELECT DISTINCT CAST({key} AS VARCHAR) AS key FROM source "
                         f"WHERE {key} IS NOT NULL AND {carrier} IS NOT NULL").to_arrow_table().column("key").to_pylist()
        bits = KeyedBits(self.key).bits(self.institution, self.id, [value.encode("utf-8") for value in values])
        return pa.table({"key": pa.array(values, pa.string()), "bit": pa.array(np.frombuffer(bits, dtype=np.int8))})


def _has_metadata(path: Path, metadata: dict[str, str]) -> bool:
    stored = pq.read_schema(path).metadata or {}
    return all(stored.get(key.encode("utf-8")) == value.encode("utf-8") for key, value in metadata.items())


def _rewrite(con: duckdb.DuckDBPyConnection, path: Path, query: str, metadata: dict[str, str]) -> None:
    """Replace ``path`` atomically by the result of ``query`` with the key-value ``metadata``."""
    with atomic_path(path) as temporary:
        con.sql(f"COPY ({query}) TO {quote_literal(str(temporary))} ({parquet_options(metadata)})")


def _choose_spec(con: duckdb.DuckDBPyConnection, types: dict[str, str], columns: Sequence[dict]) -> CarrierSpec | None:
    """Return the carrier and key of a table, or None when no column qualifies as carrier or key."""
    carrier, scale = _choose_carrier(con, types, columns, "source")
    if carrier is None:
        return None
    key = _choose_key(con, types, columns, carrier, "source")
    return None if key is None else CarrierSpec(key, carrier, scale)


def _choose_carrier(con: duckdb.DuckDBPyConnection, types: dict[str, str], columns: Sequence[dict],
                    relation: str) -> tuple[str | None, int]:
    """Return the kept amount column of ``relation`` with the most numeral values whose one unit is <= 0.1 % of its median."""
    best: tuple[int, str, int] | None = None
    for column in columns:
        name = column["name"]
        if column.get("treatment") != "keep" or column.get("class", {}).get("kind") != "amount" or name not in types:
            continue
        text = f"CAST({quote_identifier(name)} AS VARCHAR)"
        decimals = f"CASE WHEN strpos({text}, '.') > 0 THEN length({text}) - strpos({text}, '.') ELSE 0 END"
        numerals, scale, median = con.sql(
            f"SELECT count(*), min({decimals}), median(abs(CAST({text} AS DOUBLE))) FROM {relation} "
            f"WHERE regexp_matches({text}, {quote_literal(_NUMERAL)})").fetchall()[0]
        if not numerals:
            continue
        scale = min(int(scale), MAX_SCALE)
        if median is None or median < MIN_MEDIAN_UNITS * 10.0 ** -scale:
            logger.info("amount column %s not used as watermark carrier: median %s is below %s units of 10^-%s",
                        name, median, MIN_MEDIAN_UNITS, scale)
            continue
        if best is None or numerals > best[0]:
            best = (numerals, name, scale)
    return (None, 0) if best is None else (best[1], best[2])


def _choose_key(con: duckdb.DuckDBPyConnection, types: dict[str, str], columns: Sequence[dict],
                carrier: str, relation: str) -> str | None:
    """Return the token column of ``relation`` with the most distinct values, else the text or integer column with the most."""
    def usable(column: dict) -> bool:
        name = column["name"]
        if name == carrier or name not in types or column.get("treatment") == "drop":
            return False
        return types[name] == "VARCHAR" or types[name] in _INTEGER_TYPES

    tokens = [column["name"] for column in columns if usable(column) and column.get("treatment") == "token"]
    others = [column["name"] for column in columns if usable(column) and column.get("treatment") != "token"]
    candidates = tokens or others
    if not candidates:
        return None
    counts = con.sql("SELECT " + ", ".join(f"approx_count_distinct({quote_identifier(name)})" for name in candidates)
                     + f" FROM {relation}").fetchall()[0]
    best = max(range(len(candidates)), key=lambda index: (counts[index], -index))
    return candidates[best] if counts[best] > 1 else None


def _mark_helpers(value: str, scale: int) -> list[str]:
    """Return the SQL of the carrier's text, the position of its digit at ``10^-scale`` and that digit."""
    text = f"CAST({value} AS VARCHAR)"
    integer_digits = f"(CASE WHEN strpos({text}, '.') > 0 THEN strpos({text}, '.') - 1 ELSE length({text}) END)"
    position = f"({integer_digits} + {scale + (1 if scale else 0)})"
    return [text, position, f"TRY_CAST(substr({text}, {position}, 1) AS INTEGER)"]


def _marked_value(value: str, carrier_type: str, bit: str, text: str, position: str, digit: str) -> str:
    """Return the SQL of the carrier ``value`` with its digit at the position ``position`` of ``text`` set to the parity of ``bit``.

    ``text``, ``position`` and ``digit`` are the SQL of :func:`_mark_helpers`, or of columns that hold it.
    """
    marked = (f"CAST(left({text}, {position} - 1) || CAST({digit} - {digit} % 2 + {bit} AS VARCHAR)"
              f" || substr({text}, {position} + 1) AS {carrier_type})")
    condition = (f"{bit} IS NOT NULL AND regexp_matches({text}, {quote_literal(_NUMERAL)}) "
                 f"AND length({text}) >= {position}")
    return f"CASE WHEN {condition} THEN {marked} ELSE {value} END"


def _marked_sql(spec: CarrierSpec, carrier_type: str) -> str:
    """Return the SELECT that sets the carrier digit at ``10^-scale`` to the parity of each row's bit."""
    carrier = quote_identifier(spec.carrier)
    marked = _marked_value(f"src.{carrier}", carrier_type, "bits.bit", *_mark_helpers(f"src.{carrier}", spec.scale))
    return (f"SELECT src.* REPLACE ({marked} AS {carrier}) "
            f"FROM source AS src LEFT JOIN {_BITS_TABLE} AS bits "
            f"ON bits.key = CAST(src.{quote_identifier(spec.key_column)} AS VARCHAR)")


# --- registry -------------------------------------------------------------------------------------


def registry_dir(settings: Settings) -> Path:
    """Return ``<data_dir>/warehouse/watermarks``, readable by the platform only."""
    return settings.warehouse_dir / REGISTRY_DIR_NAME


def _registry_file(settings: Settings, institution: str) -> Path:
    return registry_dir(settings) / f"{institution}.json"


def _read_registry(path: Path) -> list[dict]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        builds = document["builds"]
        if document.get("format") != REGISTRY_FORMAT or not isinstance(builds, list):
            raise ValueError("format")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WatermarkRegistryInvalid(
            "WATERMARK_REGISTRY_INVALID",
            f"水印登记文件 {path} 无法读取或格式不正确（{type(error).__name__}）。请从备份恢复该文件后重试；"
            "在恢复前该机构的数据提取不会发布新版本。",
        ) from None
    return builds


def register_build(settings: Settings, watermark: BuildWatermark, manifest: dict) -> Path:
    """Add the build described by ``manifest`` to its institution's registry file and return the file.

    The caller holds the institution's build lock, so no other writer changes the file meanwhile.
    Raises WatermarkRegistryInvalid when the existing file is unreadable, and OSError.
    """
    path = _registry_file(settings, watermark.institution)
    builds = [entry for entry in _read_registry(path) if entry.get("watermark_id") != watermark.id]
    builds.append({
        "watermark_id": watermark.id,
        "institution": watermark.institution,
        "build_id": watermark.build_id,
        "built_at": manifest["built_at"],
        "key": watermark.key.label,
        "scheme": SCHEME,
        "tables": [{"name": table["name"], "file": table["file"], "sm3": table["sm3"], "rows": table["row_count"],
                    "watermark": table.get("watermark")} for table in manifest["tables"]],
    })
    document = {"format": REGISTRY_FORMAT, "institution": watermark.institution, "builds": builds}
    make_private_dirs(path.parent, settings.data_dir)
    with atomic_output(path) as stream:
        stream.write((json.dumps(document, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return path


def registered_builds(settings: Settings) -> list[dict]:
    """Return the registry entries of every institution, oldest first within each institution."""
    folder = registry_dir(settings)
    if not folder.is_dir():
        return []
    return [entry for path in sorted(folder.glob("*.json")) for entry in _read_registry(path)]


# --- identification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """Evidence for one candidate: ``matched`` of ``total`` key values, and the chance of that by accident."""

    candidate: str
    matched: int
    total: int
    chance: float
    candidates: int

    @property
    def rate(self) -> float:
        return self.matched / self.total if self.total else 0.0

    @property
    def significant(self) -> bool:
        return self.total > 0 and self.rate >= MIN_MATCH_RATE and self.chance <= MAX_CHANCE


@dataclass(frozen=True)
class Identification:
    """Result of :func:`identify_file`. ``institution`` is None when no watermark was found."""

    path: Path
    file_format: str
    metadata_id: str | None = None
    metadata_build: dict | None = None
    institution: str | None = None
    institution_score: Score | None = None
    build: dict | None = None
    build_score: Score | None = None
    published_in: tuple[str, ...] = ()
    table: str | None = None
    conflict: bool = False


def binomial_tail(matched: int, total: int) -> float:
    """Return P(X >= matched) for X ~ Binomial(total, 1/2), exactly (0.0 when below the float range)."""
    if matched <= 0:
        return 1.0
    term = math.comb(total, matched)
    tail = 0
    for count in range(matched, total + 1):
        tail += term
        term = term * (total - count) // (count + 1)
    return tail / (1 << total)


def _open_leaked(path: Path, file_format: str, encoding: str) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """Return a connection with the view ``leaked`` over the file, and its column names."""
    con = duckdb.connect(":memory:")
    literal = quote_literal(str(path))
    reader = (f"read_parquet({literal})" if file_format == "parquet"
              else f"read_csv({literal}, all_varchar=true, header=true, encoding={quote_literal(encoding)})")
    try:
        con.sql(f"CREATE VIEW leaked AS SELECT * FROM {reader}")
        names = [row[0] for row in con.sql("SELECT column_name FROM (DESCRIBE leaked)").fetchall()]
    except BaseException:
        con.close()
        raise
    return con, names


def _detect_in_file(path: Path, file_format: str, builds: list[dict], keystore: KeyStore):
    """Run :func:`_detect` over the file, or raise IdentifyInputInvalid when it cannot be read.

    A CSV that is not UTF-8 (for example GBK from a spreadsheet) is read again as Latin-1. That
    decodes every ASCII byte unchanged, and the token keys and numerals the mark needs are ASCII.
    """
    encodings = ("utf-8",) if file_format == "parquet" else ("utf-8", "latin-1")
    for encoding in encodings:
        try:
            con, names = _open_leaked(path, file_format, encoding)
            try:
                return _detect(con, set(names), builds, keystore)
            finally:
                con.close()
        except duckdb.Error as error:
            logger.info("reading %s as %s %s failed: %s", path, file_format, encoding, type(error).__name__)
            failure = error
    raise IdentifyInputInvalid(
        "IDENTIFY_FILE_UNREADABLE",
        f"无法按 {'Parquet' if file_format == 'parquet' else 'CSV'} 格式读取文件 {path}（{type(failure).__name__}）。"
        "请提供数据提取的 Parquet 文件或带表头的 CSV 导出文件。",
    )


def _file_format(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError:
        raise IdentifyInputInvalid("IDENTIFY_FILE_NOT_FOUND", f"文件 {path} 不存在，请检查路径。") from None
    except IsADirectoryError:
        raise IdentifyInputInvalid("IDENTIFY_FILE_INVALID", f"{path} 是目录，请给出一个 Parquet 或 CSV 文件。") from None
    return "parquet" if head == b"PAR1" else "csv"


def _metadata_id(path: Path, file_format: str) -> str | None:
    if file_format != "parquet":
        return None
    try:
        metadata = pq.read_schema(path).metadata or {}
        value = json.loads(metadata.get(METADATA_KEY.encode("utf-8"), b"null"))
    except (OSError, ValueError, pa.ArrowException):
        return None
    if isinstance(value, dict) and isinstance(value.get("id"), str) and WATERMARK_ID.match(value["id"]):
        return value["id"]
    return None


def _key_parities(con: duckdb.DuckDBPyConnection, spec: CarrierSpec) -> dict[str, int]:
    """Return {key value: carrier parity} of the file by majority over its rows, leaving out ties."""
    key, carrier = quote_identifier(spec.key_column), quote_identifier(spec.carrier)
    rows = con.sql(f"SELECT CAST({key} AS VARCHAR), CAST({carrier} AS VARCHAR) FROM leaked "
                   f"WHERE {key} IS NOT NULL AND {carrier} IS NOT NULL LIMIT {MAX_DETECTION_ROWS}").fetchall()
    votes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key_value, carrier_text in rows:
        parity = carrier_parity(carrier_text, spec.scale)
        if parity is not None and key_value:
            votes[key_value][parity] += 1
    return {value: int(odd > even) for value, (even, odd) in votes.items() if odd != even}


def _score(candidate: str, parities: dict[str, int], expected, candidates: int) -> Score:
    matched = sum(1 for value, parity in parities.items() if expected(value) == parity)
    chance = min(1.0, binomial_tail(matched, len(parities)) * candidates)
    return Score(candidate, matched, len(parities), chance, candidates)


def _halves(bits: KeyedBits, parities: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    halves: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for value in sorted(parities):
        half = halves[bits.role(value)]
        if len(half) < MAX_DETECTION_KEYS:
            half[value] = parities[value]
    return halves


def _table_specs(builds: Iterable[dict]) -> dict[tuple[CarrierSpec, str], list[tuple[dict, dict]]]:
    """Group the registered tables with a data mark by (carrier spec, key label)."""
    groups: dict[tuple[CarrierSpec, str], list[tuple[dict, dict]]] = defaultdict(list)
    for build in builds:
        for table in build.get("tables", []):
            mark = table.get("watermark") or {}
            if mark.get("carrier") and mark.get("id") == build.get("watermark_id"):
                spec = CarrierSpec(mark["key_column"], mark["carrier"], int(mark["scale"]))
                groups[(spec, build["key"])].append((build, table))
    return groups


def _detect(con: duckdb.DuckDBPyConnection, columns: set[str], builds: list[dict],
            keystore: KeyStore) -> tuple[Score, Score | None, dict | None, str] | None:
    """Return the best (institution score, build score, build entry, table name) of the data mark, or None."""
    best = None
    groups = {group: tables for group, tables in _table_specs(builds).items()
              if group[0].key_column in columns and group[0].carrier in columns}
    for (spec, label), tables in groups.items():
        parities = _key_parities(con, spec)
        owner, kind, version = label.split("/")
        try:
            bits = KeyedBits(keystore.get(owner, kind, int(version.removeprefix("v"))))
        except KeyStoreError as error:
            logger.warning("watermark key %s not usable for identification: %s", label, error.code)
            continue
        first, second = _halves(bits, parities)
        # Every (institution, group) pair tried is one candidate in the chance of a false match.
        institutions = sorted({build["institution"] for build, _ in tables})
        tried = sum(len({build["institution"] for build, _ in group_tables}) for group_tables in groups.values())
        scores = [_score(code, first, lambda value, code=code: bits.institution_bit(code, value), tried)
                  for code in institutions]
        institution_score = min(scores, key=lambda score: (score.chance, -score.rate))
        build_score = build = table_name = None
        if institution_score.significant:
            own = [(build, table) for build, table in tables if build["institution"] == institution_score.candidate]
            build_scores = [(_score(build["watermark_id"], second,
                                    lambda value, wm=build["watermark_id"]: bits.build_bit(wm, value), len(own)),
                             build, table) for build, table in own]
            build_score, build, table = min(build_scores, key=lambda item: (item[0].chance, -item[0].rate))
            table_name = table["name"]
        candidate = (institution_score, build_score, build, table_name or tables[0][1]["name"])
        if best is None or (institution_score.chance, -institution_score.rate) < (best[0].chance, -best[0].rate):
            best = candidate
    return best


def identify_file(settings: Settings, keystore: KeyStore, path: Path) -> Identification:
    """Identify the institution and build that a Parquet or CSV file comes from.

    Reads the Parquet metadata when present and always tests the data mark against the registry.
    ``conflict`` is True when the metadata names another institution than the data mark, which
    suggests edited metadata. Raises IdentifyInputInvalid and WatermarkRegistryInvalid.
    """
    path = Path(path)
    file_format = _file_format(path)
    builds = registered_builds(settings)
    by_id = {build["watermark_id"]: build for build in builds}
    metadata_id = _metadata_id(path, file_format)

    detected = _detect_in_file(path, file_format, builds, keystore)

    result = Identification(path, file_format, metadata_id, by_id.get(metadata_id) if metadata_id else None)
    if detected is not None:
        institution_score, build_score, build, table = detected
        result = _with_detection(result, institution_score, build_score, build, table, builds)
    elif result.metadata_build is not None:
        result = _with_metadata(result, builds)
    logger.info("identified %s: metadata %s, institution %s, build %s", path, metadata_id, result.institution,
                result.build["build_id"] if result.build else None)
    return result


def _published_in(builds: list[dict], watermark_id: str, table: str | None) -> tuple[str, ...]:
    return tuple(build["build_id"] for build in builds
                 if any((item.get("watermark") or {}).get("id") == watermark_id and (table is None or item["name"] == table)
                        for item in build.get("tables", [])))


def _with_metadata(result: Identification, builds: list[dict]) -> Identification:
    build = result.metadata_build
    assert build is not None
    return Identification(result.path, result.file_format, result.metadata_id, build, build["institution"], None,
                          build, None, _published_in(builds, build["watermark_id"], None))


def _with_detection(result: Identification, institution_score: Score, build_score: Score | None, build: dict | None,
                    table: str, builds: list[dict]) -> Identification:
    metadata_build = result.metadata_build
    if not institution_score.significant:
        if metadata_build is None:
            return Identification(result.path, result.file_format, result.metadata_id, None, None, institution_score)
        return _with_metadata(result, builds)
    institution = institution_score.candidate
    found_build = build if build_score is not None and build_score.significant else None
    if metadata_build is not None and metadata_build["institution"] == institution and found_build is None:
        found_build = metadata_build
    conflict = metadata_build is not None and metadata_build["institution"] != institution
    published = _published_in(builds, found_build["watermark_id"], table) if found_build else ()
    return Identification(result.path, result.file_format, result.metadata_id, metadata_build, institution,
                          institution_score, found_build, build_score, published, table, conflict)
