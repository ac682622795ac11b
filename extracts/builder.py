"""Masked extracts: one versioned folder per institution that its sandbox users may read.

:func:`build_institution` reads the institution's tables from the warehouse: the accepted report
data of :mod:`intake.warehouse` and the demo ``applications`` table of :mod:`extracts.warehouse`.
It decrypts them into a private work folder below the warehouse and applies the approved masking
policy (:mod:`extracts.policy`) to every column in DuckDB SQL (:mod:`extracts.masking`). The
class of a column is ``classes[(table, column)]``, where ``table`` is the template code (or
``applications``). An intake column missing from ``classes`` (not even a proposed class from
the catalog) stops the build with :class:`ExtractColumnUnclassified`. A column the catalog
proposed a class for but no steward confirmed arrives at level 4 (see
:func:`catalog.classes.effective_class`). The intake column ``_period`` (the reporting period) is
platform metadata and kept.

Each table's k-anonymity over the quasi-identifiers the policy declares is reported in the
manifest (:mod:`extracts.kanon`). A table below ``Settings.extract_k_anonymity`` stops the build
unless the caller passes a :class:`~extracts.kanon.KOverride`.

Each table becomes ``<table>.parquet``. ``manifest.json`` lists the tables with their columns,
classes and treatments, row counts, SM3 digests and source partitions, the policy version and
digest and the key versions; ``manifest.json.sig`` is the platform's detached SM2 signature of
it. Every table written by a build carries the build's watermark, which is also recorded in the
manifest and in the platform's watermark registry (:mod:`extracts.watermark`). The folder is
published atomically (:mod:`extracts.publish`).

An institution that reported corporate customers or loans also gets the table of cross-institution
features about its own customers (:mod:`extracts.features`), with values built from fewer than
``extract_feature_min_contributors`` other institutions suppressed. :func:`build_all` computes those
features once for all institutions, and only when an input partition, the policy or the token key
changed since the published build.

Incremental builds: a table whose source partitions (the digests in the warehouse manifests),
classes, policy and token key are those of the published build is hard-linked from it instead of
being masked again. When only some periods of an intake table changed, only those partitions are
decrypted and masked, and the rows of the other periods are copied from the previous table. When
nothing changed at all, nothing is written. The rows of a masked table are not in warehouse
order, because the token joins reorder them.

Every failure raises a :class:`~regsandbox_core.errors.RegsandboxError` with a code and a Chinese
message before anything is published: the unfinished build folder is deleted and the previous
extract stays in place. :class:`ExtractOutcome` describes what a build did, for the caller's audit
event (this package writes no audit events itself).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb

from catalog.classes import ColumnClass
from extracts.demo_data import DEMO_CLASSES, DEMO_FEATURE_CLASS
from extracts.features import FEATURES_TABLE, CrossInstitutionFeatures
from extracts.kanon import KOverride, assess, enforce, generalise_quasi_identifier
from extracts.masking import (
    TOKEN_TABLE,
    ColumnPlan,
    merge_periods,
    parquet_options,
    quote_literal,
    TokenDictionary,
    copy_with_sm3,
    select_sql,
)
from extracts.policy import MaskingPolicy, PolicyNotApproved, load_approved_policy, verified_policy
from extracts.publish import (
    ExtractPermissions,
    build_lock,
    create_build_dir,
    current_build,
    discard_build,
    extract_dir,
    new_build_id,
    prepare_root,
    publish,
    resolve_permissions,
    write_trusted_keys,
)
from extracts.sources import (
    SOURCE_DEMO,
    ExtractSourceError,
    SourcePartition,
    SourceTable,
    decrypt_demo,
    decrypted_batches,
    demo_table,
    intake_tables,
)
from extracts.warehouse import APPLICATIONS_TABLE, partition_key_label, warehouse_institutions
from extracts.watermark import SCHEME as WATERMARK_SCHEME
from extracts.watermark import BuildWatermark, active_watermark_key, register_build
from intake.warehouse import PERIOD_COLUMN
from regsandbox_core.crypto import TOKEN_SCHEME, sm3_file, sm3_hex
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_output
from regsandbox_core.keystore import KIND_SIGNING, KIND_TOKEN, PLATFORM_OWNER, KeyStore, KeyVersion, NoActiveKey
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, SignedObjectInvalid, sign_file, verify_file

__all__ = [
    "ExtractColumnUnclassified",
    "ExtractDirNotWritable",
    "ExtractKeyMissingError",
    "ExtractOutcome",
    "ExtractWriteFailed",
    "ExtractPermissions",
    "InvalidInstitutionError",
    "MANIFEST_NAME",
    "WarehouseMissingError",
    "build_all",
    "build_extract",
    "build_institution",
    "extract_dir",
    "resolve_permissions",
]

logger = logging.getLogger(__name__)

INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "regsandbox-extract/2"
MANIFEST_SIGNATURE_KIND = "extract_manifest"
PLATFORM_COLUMNS: dict[str, ColumnClass] = {PERIOD_COLUMN: ColumnClass(level=1)}
"""Columns the platform adds to intake partitions; kept whatever treatment the policy gives level 1."""
_RESERVED_COLUMNS = ("_extract_file",)
WORK_DIR_PREFIX = ".extract-work-"
STALE_WORK_DIR_SECONDS = 24 * 3600
"""Age after which a work folder is taken to be left over by a killed build (builds take minutes)."""

ColumnClasses = Mapping[tuple[str, str], ColumnClass]


class InvalidInstitutionError(RegsandboxError):
    """The institution code is malformed or has no rows in the warehouse."""


class ExtractKeyMissingError(RegsandboxError):
    """The key store has no active token key of the institution or no active platform signing key."""

    status = 409


class WarehouseMissingError(RegsandboxError):
    """The warehouse contains no data yet, so no extract can be built."""

    status = 409


class ExtractDirNotWritable(RegsandboxError):
    """The extract folder cannot be created or written."""

    status = 500


class ExtractWriteFailed(RegsandboxError):
    """Reading the decrypted warehouse data or writing the new build failed (disk full, I/O error)."""

    status = 500


class ExtractColumnUnclassified(RegsandboxError):
    """A warehouse column that the column classes passed to the build do not mention at all."""

    status = 409


class ExtractSourceColumnInvalid(RegsandboxError):
    """Warehouse column whose name collides with a column the builder adds."""

    status = 500


@dataclass(frozen=True)
class TableOutcome:
    """One table of a build: ``rebuilt`` False when the previous file was reused, and the periods masked anew."""

    name: str
    rows: int
    sm3: str
    rebuilt: bool
    periods_rebuilt: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtractOutcome:
    """Result of one build: ``published`` (a new build is live) or ``unchanged`` (nothing written)."""

    institution: str
    status: str
    folder: Path
    build_id: str
    policy_name: str
    policy_version: int
    policy_sm3: str
    token_key: str
    manifest_sm3: str
    tables: tuple[TableOutcome, ...] = field(default_factory=tuple)
    k_anonymity: dict = field(default_factory=dict)
    """The manifest's ``k_anonymity`` section: k, whether every table passed, the override applied and the table reports."""

    def audit_detail(self) -> dict:
        """Return a JSON-serialisable summary for an audit event (no data values, no key material)."""
        return {
            "institution": self.institution, "status": self.status, "build_id": self.build_id,
            "policy": {"name": self.policy_name, "version": self.policy_version, "sm3": self.policy_sm3},
            "token_key": self.token_key, "manifest_sm3": self.manifest_sm3,
            "tables": [{"name": table.name, "rows": table.rows, "sm3": table.sm3, "rebuilt": table.rebuilt,
                        "periods_rebuilt": list(table.periods_rebuilt)} for table in self.tables],
            "k_anonymity": self.k_anonymity,
        }


# --- checks ----------------------------------------------------------------------------------------


def validate_institution(settings: Settings, institution_code: str) -> None:
    """Raise InvalidInstitutionError unless the code is well-formed."""
    if not INSTITUTION_CODE.match(institution_code):
        raise InvalidInstitutionError(
            "INVALID_INSTITUTION_CODE",
            f"机构代码 {institution_code!r} 格式不正确：应以小写字母开头，只含小写字母、数字和下划线，长度 2–32，例如 bank_a。",
        )


def _active_key(keystore: KeyStore, owner: str, kind: str) -> KeyVersion:
    """Return the active version, or raise ExtractKeyMissingError telling the operator what to run."""
    try:
        return keystore.current(owner, kind)
    except NoActiveKey:
        purpose = "平台签名密钥" if kind == KIND_SIGNING else f"机构 {owner} 的令牌化密钥"
        raise ExtractKeyMissingError(
            "EXTRACT_KEY_MISSING",
            f"密钥库中没有启用状态的{purpose}（{owner}/{kind}），无法生成数据提取，原有提取保持不变。"
            "请运行 `regsandbox init` 补齐密钥；若该密钥已被吊销，请由密钥管理员生成并启用新版本。",
        ) from None


def _sources(settings: Settings, institution_code: str,
             accepted_ids: Mapping[str, Collection[int]] | None) -> list[SourceTable]:
    tables = intake_tables(settings, institution_code, accepted_ids)
    demo = demo_table(settings, institution_code)
    if demo is not None:
        tables.insert(0, demo)
    if tables:
        return tables
    if not warehouse_institutions(settings) and not (settings.warehouse_dir / "intake").is_dir():
        raise WarehouseMissingError(
            "WAREHOUSE_EMPTY",
            f"数据仓库 {settings.warehouse_dir} 中没有数据。请先审核通过报送数据，或运行 `python -m extracts load-demo` 导入演示数据。",
        )
    raise InvalidInstitutionError(
        "INSTITUTION_NOT_IN_WAREHOUSE",
        f"数据仓库中没有机构 {institution_code} 的数据。可用的机构代码：{'、'.join(warehouse_codes(settings)) or '（无）'}。",
    )


def warehouse_codes(settings: Settings) -> list[str]:
    """Return the institution codes with data in the warehouse: demo partitions and intake partitions."""
    codes = set(warehouse_institutions(settings))
    root = settings.warehouse_dir / "intake"
    if root.is_dir():
        codes.update(path.name.split("=", 1)[1] for path in root.glob("*/institution=*") if path.is_dir())
    return sorted(code for code in codes if INSTITUTION_CODE.match(code))


# --- column plans ---------------------------------------------------------------------------------


def _column_class(table: SourceTable, column: str, classes: ColumnClasses) -> ColumnClass | None:
    """Return the class of a column, or None when ``classes`` does not mention it."""
    if (table.catalog_table, column) in classes:
        return classes[(table.catalog_table, column)]
    if table.kind == SOURCE_DEMO:
        return DEMO_CLASSES.get(column, DEMO_FEATURE_CLASS)
    if column in PLATFORM_COLUMNS:
        return PLATFORM_COLUMNS[column]
    return None


def _plan(table: SourceTable, columns: list[str], classes: ColumnClasses, policy: MaskingPolicy) -> list[ColumnPlan]:
    """Return the treatment of every column, or raise ExtractColumnUnclassified when a column has no class at all."""
    plans = []
    unclassified = []
    for column in columns:
        column_class = _column_class(table, column, classes)
        if column_class is None:
            unclassified.append(column)
            continue
        if column in PLATFORM_COLUMNS and table.kind != SOURCE_DEMO:
            plans.append(ColumnPlan(column, column_class, True, "platform-metadata", "keep"))
            continue
        plan = ColumnPlan.from_rule(column, column_class, True, policy.rule_for(column_class))
        plans.append(generalise_quasi_identifier(plan, policy, table.catalog_table))
    if unclassified:
        raise ExtractColumnUnclassified(
            "EXTRACT_COLUMN_UNCLASSIFIED",
            f"表 {table.catalog_table} 的字段 {'、'.join(unclassified)} 在数据目录中没有任何分级分类（连建议分类也没有），"
            "无法确定脱敏方式，未发布新的数据提取，原有提取保持不变。请运行 `python -m admin_api.manage catalog-sync` 同步数据目录，"
            "再用 `python -m admin_api.manage catalog-classes` 重新导出分级分类后重试。",
        )
    return plans


def _inputs(table: SourceTable, classes: ColumnClasses, policy: MaskingPolicy, token_key: KeyVersion) -> dict:
    """Return what a table's content depends on besides its partitions: policy, token key and classes."""
    table_classes = sorted(
        [column, value.level, value.pi_category, value.kind]
        for (catalog_table, column), value in classes.items() if catalog_table == table.catalog_table
    )
    # "unclassified": tables built before unclassified columns were rejected are masked again once.
    return {"format": MANIFEST_FORMAT, "policy": policy.sm3, "token_key": token_key.label, "classes": table_classes,
            "unclassified": "rejected", "watermark": WATERMARK_SCHEME, "token": TOKEN_SCHEME}


def _fingerprint(inputs: dict, partitions: list[dict]) -> str:
    """Return the SM3 of everything a table's content depends on, to decide whether to rebuild it."""
    return _digest({**inputs, "partitions": partitions})


# --- building one table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenFile:
    """A file and the SM3 of its content when it was written."""

    path: Path
    sm3: str
    identity: tuple[int, int, int, int]

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int, int]:
        status = path.stat()
        return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns

    @classmethod
    def of(cls, path: Path, sm3: str) -> WrittenFile:
        return cls(path, sm3, cls._identity(path))

    def sm3_now(self) -> str:
        """Return the SM3 of the file: the one from writing while the file was neither replaced nor changed since."""
        # The watermark step replaces the file when it adds the data mark (a new inode).
        if self._identity(self.path) == self.identity:
            return self.sm3
        return sm3_file(self.path)


def _source_sql(files: list[Path]) -> str:
    listing = "[" + ", ".join(quote_literal(str(path)) for path in files) + "]"
    return f"read_parquet({listing}, union_by_name=true)"


def _source_columns(con: duckdb.DuckDBPyConnection, table: SourceTable, files: list[Path]) -> list[str]:
    """Return the columns of ``files``; raise when one of them is a column name the platform reserves."""
    columns = [row[0] for row in con.sql(f"DESCRIBE SELECT * FROM {_source_sql(files)}").fetchall()]
    clash = sorted(set(columns) & set(_RESERVED_COLUMNS))
    if clash:
        raise ExtractSourceColumnInvalid(
            "EXTRACT_COLUMN_RESERVED",
            f"表 {table.catalog_table} 含有平台保留的列名 {'、'.join(clash)}，无法生成数据提取。请联系平台管理员调整报表模板字段代码。",
        )
    return columns


def _may_carry(plan: ColumnPlan) -> bool:
    """Return whether the column may carry a watermark's data mark: a kept amount (see extracts.watermark)."""
    return plan.treatment == "keep" and plan.quasi_identifier is None and plan.column_class.kind == "amount"


def _decrypt_and_tokenise(store: KeyStore, institution_code: str, table: SourceTable, work_dir: Path,
                          classes: ColumnClasses, policy: MaskingPolicy, token_key: KeyVersion,
                          token_cache: dict[bytes, bytes], watermark: BuildWatermark | None = None,
                          ) -> tuple[list[Path], TokenDictionary]:
    """Decrypt the partitions of ``table`` into ``work_dir`` and tokenise their token columns on the way.

    The new values of each batch of decrypted partitions are tokenised while the next partitions
    are decrypted (:func:`extracts.sources.decrypted_batches`). In benchmarks/extract_build.py this
    hid most of the HMAC-SM3 time behind the SM4 decryption. With ``watermark``, when a column may
    carry its data mark, the tokens' bits are computed the same way.
    """
    files: list[Path] = []
    con = duckdb.connect(":memory:")
    # Spilled intermediate results contain raw values, so they stay in the private work folder.
    con.sql(f"SET temp_directory={quote_literal(str(work_dir / 'spill'))}")
    tokens = TokenDictionary(token_key.key, con, token_cache)
    try:
        for batch in decrypted_batches(store, institution_code, table, work_dir):
            files.extend(batch)
            plans = _plan(table, _source_columns(con, table, batch), classes, policy)
            if watermark is not None and any(_may_carry(plan) for plan in plans):
                tokens.compute_bits(watermark.token_bits)
            tokens.add(_source_sql(batch), [plan.name for plan in plans if plan.treatment == "token"])
    finally:
        tokens.close()
        con.close()
    return files, tokens


def _mask_table(table: SourceTable, files: list[Path], target: Path, work_dir: Path, classes: ColumnClasses,
                policy: MaskingPolicy, token_key: KeyVersion, token_cache: dict[bytes, bytes],
                metadata: Mapping[str, str] | None = None, tokens: TokenDictionary | None = None,
                watermark: BuildWatermark | None = None) -> tuple[list[ColumnPlan], WrittenFile, dict | None]:
    """Write the masked table, with ``metadata`` as Parquet key-value metadata, to ``target`` in one DuckDB COPY.

    ``tokens`` holds the tokens of every value of the token columns in ``files`` when
    :func:`_decrypt_and_tokenise` made them; without it they are computed here. With ``watermark``
    the data mark is written in the same COPY when the table's key is a token column (see
    :meth:`BuildWatermark.plan_token_mark`), which spares writing the table a second time.
    Returns the column plans, the file with its SM3 as written, and the watermark entry of the
    table when its data mark was written, else None.
    """
    con = duckdb.connect(":memory:")
    try:
        # Spilled intermediate results contain raw values, so they stay in the private work folder.
        con.sql(f"SET temp_directory={quote_literal(str(work_dir / 'spill'))}")
        columns = _source_columns(con, table, files)
        con.sql(f"CREATE VIEW source AS SELECT * FROM {_source_sql(files)}")
        plans = _plan(table, columns, classes, policy)
        if tokens is None:
            tokens = TokenDictionary(token_key.key, con, token_cache)
            try:
                tokens.add("source", [plan.name for plan in plans if plan.treatment == "token"])
            finally:
                tokens.close()
        token_table = tokens.table()
        planned = None
        if watermark is not None:
            planned = watermark.plan_token_mark(con, "source", [plan.manifest_entry() for plan in plans])
        if planned is not None and "bit" not in token_table.column_names:
            token_table = token_table.append_column("bit", watermark.token_bits(token_table.column("token").combine_chunks()))
        con.register(TOKEN_TABLE, token_table)
        # NOTE: DuckDB's hash joins for the tokens do not keep the rows' order, and sorting them
        # back took about 40 % of the masking time in benchmarks/extract_build.py, so a masked
        # table's row order is not the warehouse order. Unchanged inputs are not rebuilt, so a
        # published table still changes only when its inputs change.
        query = select_sql(plans, "source", planned[1] if planned is not None else None)
        sm3 = copy_with_sm3(con, query, target, parquet_options(metadata), work_dir)
    finally:
        con.close()
    applied = watermark.applied_entry(table.name, planned[0]) if planned is not None else None
    return plans, WrittenFile.of(target, sm3), applied


def describe_parquet(path: Path) -> tuple[list[dict[str, str]], int]:
    """Return the columns (name and DuckDB type) and the row count of a Parquet file."""
    con = duckdb.connect()
    try:
        relation = con.read_parquet(str(path))
        columns = [{"name": name, "type": str(dtype)} for name, dtype in zip(relation.columns, relation.types)]
        (row_count,) = con.sql("SELECT count(*) FROM read_parquet($path)", params={"path": str(path)}).fetchall()[0]
    finally:
        con.close()
    return columns, int(row_count)


# --- previous build -------------------------------------------------------------------------------


def _previous_manifest(settings: Settings, keystore: KeyStore, institution_code: str) -> tuple[Path | None, dict]:
    """Return the published build and its manifest, or (None, {}) when none verifies."""
    folder = current_build(settings, institution_code)
    if folder is None:
        return None, {}
    manifest_path = folder / MANIFEST_NAME
    try:
        verify_file(manifest_path, keystore)
        document = json.loads(manifest_path.read_text("utf-8"))
    except (SignatureInvalid, SignedObjectInvalid, OSError, ValueError) as error:
        logger.warning("published extract %s not reused, its manifest does not verify: %s", folder, error)
        return None, {}
    if document.get("format") != MANIFEST_FORMAT:
        return None, {}
    return folder, document


def _reuse(previous: Path | None, document: dict, name: str, fingerprint: str, target: Path) -> dict | None:
    """Hard-link the previous build's table when its fingerprint and digest match; return its manifest entry."""
    if previous is None:
        return None
    entry = next((item for item in document.get("tables", []) if item.get("name") == name), None)
    if entry is None or entry.get("fingerprint") != fingerprint:
        return None
    source = previous / entry["file"]
    try:
        if sm3_file(source) != entry.get("sm3"):
            logger.warning("extract table %s of the published build changed on disk; rebuilding it", source)
            return None
        os.link(source, target)
    except OSError:
        return None
    return entry


# --- cross-institution features (extracts.features) ----------------------------------------------


def _keep_equal_features(previous: Path | None, document: dict, content_sm3: str, slice_inputs_sm3: str,
                         target: Path) -> dict | None:
    """Replace ``target`` by a hard link to the published feature table when its rows are the same; return its entry.

    The rows are the same when the unmarked file written now has the digest that the published
    table had before its watermark (``content_sm3``) and the policy, key, k and plans are those
    of the published table (``slice_inputs_sm3``).
    """
    if previous is None:
        return None
    entry = next((item for item in document.get("tables", []) if item.get("name") == FEATURES_TABLE), None)
    if entry is None or entry.get("content_sm3") != content_sm3 or entry.get("slice_inputs_sm3") != slice_inputs_sm3:
        return None
    source = previous / entry["file"]
    try:
        if sm3_file(source) != entry.get("sm3"):
            return None
        target.unlink()
        os.link(source, target)
    except OSError:
        return None
    return entry


def _build_feature_table(features: CrossInstitutionFeatures, institution_code: str, build: Path,
                         classes: ColumnClasses, policy: MaskingPolicy, token_key: KeyVersion, previous: Path | None,
                         previous_manifest: dict, watermark: BuildWatermark) -> tuple[dict, TableOutcome] | None:
    """Write the institution's cross-institution feature table into ``build``, or reuse the previous one.

    Returns None when the institution reported no corporate customers or loans. The manifest entry
    lists no source partitions, because they belong to every institution of the warehouse.
    """
    if not features.has_customers(institution_code):
        return None
    target = build / f"{FEATURES_TABLE}.parquet"
    if target.exists():
        raise ExtractSourceError(
            "EXTRACT_TABLE_NAME_CLASH",
            f"报表模板的数据提取表名与跨机构客户特征表 {FEATURES_TABLE} 冲突，无法生成数据提取。请联系平台管理员调整报表模板代码。",
        )
    plans = features.column_plans(classes, policy)
    inputs = {"format": MANIFEST_FORMAT, "policy": policy.sm3, "token_key": token_key.label, "watermark": WATERMARK_SCHEME,
              "token": TOKEN_SCHEME,
              **features.fingerprint_inputs(plans)}
    fingerprint = _digest(inputs)
    reused = _reuse(previous, previous_manifest, FEATURES_TABLE, fingerprint, target)
    if reused is not None:
        return reused, TableOutcome(FEATURES_TABLE, reused["row_count"], reused["sm3"], rebuilt=False)
    features.write_table(institution_code, target, plans, token_key.key)
    # A change anywhere in the warehouse changes the fingerprint of every institution's feature
    # table, but often not the institution's own rows (most aggregates of a customer do not move,
    # or stay suppressed). The table is written sorted, so equal rows give an equal file: when it
    # equals the published one and nothing but the warehouse changed, the published table is kept
    # and the extract stays unchanged.
    content_sm3 = sm3_file(target)
    slice_inputs_sm3 = _digest({key: value for key, value in inputs.items() if key != "warehouse"})
    published_entry = _keep_equal_features(previous, previous_manifest, content_sm3, slice_inputs_sm3, target)
    if published_entry is not None:
        return published_entry, TableOutcome(FEATURES_TABLE, published_entry["row_count"], published_entry["sm3"],
                                             rebuilt=False)
    plan_entries = [plan.manifest_entry() for plan in plans]
    # The feature values are exact aggregates, so they carry the metadata layer of the watermark only.
    table_watermark = watermark.mark_table(target, FEATURES_TABLE, plan_entries, data_mark=False)
    entry = _table_entry(features.source_table(), plan_entries, target, fingerprint, [])
    entry["features"] = features.manifest_entry()
    entry["watermark"] = table_watermark
    entry["content_sm3"] = content_sm3
    entry["slice_inputs_sm3"] = slice_inputs_sm3
    return entry, TableOutcome(FEATURES_TABLE, entry["row_count"], entry["sm3"], rebuilt=True)


# --- the build ------------------------------------------------------------------------------------


def _write_json(document: dict, path: Path, permissions: ExtractPermissions) -> None:
    text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    with atomic_output(path, before_replace=lambda temporary: permissions.apply(temporary, is_dir=False)) as stream:
        stream.write(text.encode("utf-8"))


def _table_entry(table: SourceTable, plan_entries: list[dict], path: Path, fingerprint: str,
                 partitions: list[dict], written: WrittenFile | None = None) -> dict:
    columns, row_count = describe_parquet(path)
    types = {column["name"]: column["type"] for column in columns}
    described = []
    for plan_entry in plan_entries:
        entry = dict(plan_entry)
        if entry["treatment"] != "drop":
            entry["type"] = types[entry["name"]]
        described.append(entry)
    return {
        "name": table.name,
        "file": path.name,
        "source": {"kind": table.kind, "table": table.catalog_table, "partitions": partitions},
        "columns": [column for column in described if column["treatment"] != "drop"],
        "dropped_columns": [column for column in described if column["treatment"] == "drop"],
        "row_count": row_count,
        "size": path.stat().st_size,
        "sm3": written.sm3_now() if written is not None and written.path == path else sm3_file(path),
        "fingerprint": fingerprint,
    }


def _build_tables(settings: Settings, store: KeyStore, institution_code: str, sources: list[SourceTable],
                  build: Path, classes: ColumnClasses, policy: MaskingPolicy, token_key: KeyVersion,
                  previous: Path | None, previous_manifest: dict, watermark: BuildWatermark,
                  ) -> tuple[list[dict], list[TableOutcome]]:
    """Write every table into ``build``; return the manifest entries and the outcomes.

    A table written anew carries ``watermark``. A reused table keeps the mark of the build that
    wrote it, and its manifest entry (copied from the previous manifest) names that build's id.
    """
    entries: list[dict] = []
    outcomes: list[TableOutcome] = []
    work_root = settings.warehouse_dir
    work_root.mkdir(parents=True, exist_ok=True)
    _delete_stale_work_dirs(work_root)
    work_dir = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX, dir=work_root))
    # Tokens already computed in this build (UTF-8 value -> token under this institution's key).
    token_cache: dict[bytes, bytes] = {}
    try:
        for table in sources:
            target = build / f"{table.name}.parquet"
            inputs = _inputs(table, classes, policy, token_key)
            demo_file = None
            if table.kind == SOURCE_DEMO:
                demo_file, digest = decrypt_demo(settings, store, institution_code, work_dir)
                key_version = int(partition_key_label(settings, institution_code).rsplit("/v", 1)[1])
                partitions = [SourcePartition(None, table.partitions[0].path, digest,
                                              key_version=key_version).manifest_entry()]
            else:
                partitions = [partition.manifest_entry() for partition in table.partitions]
            fingerprint = _fingerprint(inputs, partitions)
            reused = _reuse(previous, previous_manifest, table.name, fingerprint, target)
            if reused is not None:
                entries.append(reused)
                outcomes.append(TableOutcome(table.name, reused["row_count"], reused["sm3"], rebuilt=False))
                continue
            metadata = watermark.parquet_metadata(table.name)
            if demo_file is not None:
                plans, written, applied = _mask_table(table, [demo_file], target, work_dir, classes, policy,
                                                      token_key, token_cache, metadata, watermark=watermark)
                plan_entries, periods = [plan.manifest_entry() for plan in plans], []
            else:
                plan_entries, periods, written, applied = _build_intake_table(
                    store, institution_code, table, target, work_dir, classes, policy, token_key, inputs, token_cache,
                    previous, previous_manifest, metadata, watermark)
            if applied is not None:
                table_watermark = applied
            else:
                table_watermark = watermark.mark_table(target, table.name, plan_entries)
            entry = _table_entry(table, plan_entries, target, fingerprint, partitions, written)
            entry["inputs_sm3"] = _digest(inputs)
            entry["watermark"] = table_watermark
            entries.append(entry)
            outcomes.append(TableOutcome(table.name, entry["row_count"], entry["sm3"], True, tuple(periods)))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return entries, outcomes


def _delete_stale_work_dirs(work_root: Path) -> None:
    """Delete work folders (decrypted plaintext) that a build killed before its cleanup left behind."""
    cutoff = time.time() - STALE_WORK_DIR_SECONDS
    for folder in work_root.glob(f"{WORK_DIR_PREFIX}*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder)
                logger.warning("deleted stale extract work folder %s", folder)
        except OSError as error:
            logger.warning("stale extract work folder %s not deleted: %s", folder, error)


def _build_intake_table(store: KeyStore, institution_code: str, table: SourceTable, target: Path, work_dir: Path,
                        classes: ColumnClasses, policy: MaskingPolicy, token_key: KeyVersion, inputs: dict,
                        token_cache: dict[bytes, bytes], previous: Path | None,
                        previous_manifest: dict, metadata: Mapping[str, str], watermark: BuildWatermark,
                        ) -> tuple[list[dict], list[str], WrittenFile, dict | None]:
    """Write the masked intake table to ``target``, masking only the periods that changed since the last build.

    Without a previous table built from the same policy, token key and classes, all partitions are
    masked in one pass. Otherwise the rows of unchanged periods are copied from the previous table,
    and only new or changed periods are decrypted and masked. Their rows follow the copied rows, so
    a corrected period moves to the end of the table. Returns the column entries, the periods masked,
    the table file with its SM3 as written, and the table's watermark entry when the data mark was
    written with the masking (a table masked in one pass), else None.
    """
    prior = _prior_table(previous, previous_manifest, table.name, _digest(inputs))
    if prior is None:
        files, tokens = _decrypt_and_tokenise(store, institution_code, table, work_dir, classes, policy, token_key,
                                              token_cache, watermark)
        plans, written, applied = _mask_table(table, files, target, work_dir, classes, policy, token_key, token_cache,
                                              metadata, tokens, watermark)
        periods = [item.period or "" for item in table.partitions]
        return [plan.manifest_entry() for plan in plans], periods, written, applied

    prior_path, prior_entry = prior
    changed = tuple(item for item in table.partitions if item.manifest_entry() not in prior_entry["source"]["partitions"])
    kept = [item.period or "" for item in table.partitions if item not in changed]
    entries = {column["name"]: {key: value for key, value in column.items() if key != "type"}
               for column in prior_entry["columns"] + prior_entry["dropped_columns"]}
    changed_file = work_dir / f"{table.name}.changed.parquet"
    if changed:
        files, tokens = _decrypt_and_tokenise(store, institution_code, replace(table, partitions=changed), work_dir,
                                              classes, policy, token_key, token_cache)
        plans, _written, _applied = _mask_table(table, files, changed_file, work_dir, classes, policy, token_key,
                                                token_cache, tokens=tokens)
        for path in files:
            path.unlink(missing_ok=True)
        for plan in plans:
            entries.setdefault(plan.name, plan.manifest_entry())
    sm3 = merge_periods(prior_path, kept, changed_file if changed else None, target, work_dir, metadata)
    return list(entries.values()), [item.period or "" for item in changed], WrittenFile.of(target, sm3), None


def _digest(document: dict) -> str:
    return sm3_hex(json.dumps(document, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def _prior_table(previous: Path | None, document: dict, name: str, inputs_sm3: str) -> tuple[Path, dict] | None:
    """Return the previous build's file and entry of a table built from the same inputs, if its digest still matches."""
    if previous is None:
        return None
    entry = next((item for item in document.get("tables", []) if item.get("name") == name), None)
    if entry is None or entry.get("inputs_sm3") != inputs_sm3:
        return None
    path = previous / entry["file"]
    try:
        if sm3_file(path) != entry.get("sm3"):
            logger.warning("extract table %s of the published build changed on disk; not reused", path)
            return None
    except OSError:
        return None
    return path, entry


def _manifest(institution_code: str, build_id: str, policy: MaskingPolicy, token_key: KeyVersion,
              signing_key: KeyVersion, entries: list[dict]) -> dict:
    document = {
        "format": MANIFEST_FORMAT,
        "institution": institution_code,
        "build_id": build_id,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "policy": policy.manifest_entry(),
        "token_key": token_key.label,
        "token_key_version": token_key.version,
        "key_versions": {
            "token": token_key.label,
            "signing": signing_key.label,
            "data": sorted({f"{institution_code}/data/v{partition['key_version']}" for entry in entries
                            for partition in entry["source"]["partitions"] if partition.get("key_version")}),
        },
        "tables": entries,
    }
    if any(entry["name"] == APPLICATIONS_TABLE for entry in entries):
        document["target"] = {"table": APPLICATIONS_TABLE, "column": "creditability", "positive_class": 1,
                              "meaning": "1 = 违约（bad），0 = 正常（good）"}
    return document


def _unchanged(previous: Path | None, previous_manifest: dict, entries: list[dict], outcomes: list[TableOutcome],
               permissions: ExtractPermissions) -> bool:
    """True when every table was reused, no table was added or removed, and the folder has the wanted owner."""
    if previous is None or any(outcome.rebuilt for outcome in outcomes):
        return False
    if [entry["name"] for entry in entries] != [entry.get("name") for entry in previous_manifest.get("tables", [])]:
        return False
    status = previous.stat()
    if (status.st_mode & 0o7777) != permissions.dir_mode:
        return False
    return permissions.gid is None or (status.st_uid, status.st_gid) == (permissions.uid, permissions.gid)


def _not_writable(settings: Settings, error: OSError) -> ExtractDirNotWritable:
    return ExtractDirNotWritable(
        "EXTRACT_DIR_NOT_WRITABLE",
        f"无法写入数据提取目录 {error.filename or settings.extracts_dir}（{error.strerror}），未发布新的数据提取，原有提取保持不变。"
        "请检查该目录是否存在、是否为目录、磁盘空间和写权限后重试。",
    )


def build_institution(
    settings: Settings,
    institution_code: str,
    *,
    classes: ColumnClasses | None = None,
    policy: MaskingPolicy | None = None,
    unix_group: str | None = None,
    keystore: KeyStore | None = None,
    accepted_ids: Mapping[str, Collection[int]] | None = None,
    features: CrossInstitutionFeatures | None = None,
    k_override: KOverride | None = None,
    policy_verified: bool = False,
) -> ExtractOutcome:
    """Build, sign and publish the masked extract of one institution and return what was done.

    ``policy`` must come from :func:`extracts.policy.load_approved_policy`, and its signature is
    verified again here, unless ``policy_verified`` is True: a caller that builds many
    institutions in one run and loaded ``policy`` at the start of that run passes True, so the
    policy is verified once per run (as :func:`build_all` does). The default is the newest approved
    policy; with none approved the build raises ``POLICY_NOT_APPROVED`` and never approves one
    itself. ``classes`` maps (template code, field code) to the
    column's effective class (see :func:`catalog.classes.effective_class`). ``features`` is the
    cross-institution feature set of a run over many institutions (see :func:`build_all`); without
    it, this build lists the warehouse's inputs itself and computes the features only if they changed.
    ``k_override`` lets a build below k be published; the caller must have checked that its actor
    is a security admin and audits the outcome, whose ``audit_detail()`` contains the override.

    Raises InvalidInstitutionError, WarehouseMissingError, ExtractKeyMissingError,
    WatermarkKeyMissing, WatermarkRegistryInvalid, PolicyNotApproved, PolicyInvalid, ExtractSourceError,
    ExtractColumnUnclassified, KAnonymityBelowError, QuasiIdentifierMissing, the demo warehouse's
    partition errors and ExtractDirNotWritable. None of them leaves a new build published.
    """
    return _build_institution(settings, institution_code, classes=classes, policy=policy,
                              policy_verified=policy_verified,
                              unix_group=unix_group, keystore=keystore, accepted_ids=accepted_ids, features=features,
                              k_override=k_override)


def _build_institution(
    settings: Settings,
    institution_code: str,
    *,
    classes: ColumnClasses | None,
    policy: MaskingPolicy | None,
    policy_verified: bool,
    unix_group: str | None,
    keystore: KeyStore | None,
    accepted_ids: Mapping[str, Collection[int]] | None,
    features: CrossInstitutionFeatures | None,
    k_override: KOverride | None,
) -> ExtractOutcome:
    """Do the work of :func:`build_institution`; ``policy_verified`` True skips verifying ``policy`` again.

    :func:`build_all` passes True, for the policy it verified at the start of its run.
    """
    if k_override is not None and not isinstance(k_override, KOverride):
        raise TypeError("k_override must be a KOverride")
    validate_institution(settings, institution_code)
    sources = _sources(settings, institution_code, accepted_ids)
    if keystore is None:
        keystore = open_keystore(settings)
    token_key = _active_key(keystore, institution_code, KIND_TOKEN)
    signing_key = _active_key(keystore, PLATFORM_OWNER, KIND_SIGNING)
    watermark_key = active_watermark_key(keystore)
    if not policy_verified or policy is None:
        policy = _verified(settings, keystore, policy)
    classes = dict(classes or {})
    permissions = resolve_permissions(unix_group)
    own_features = features is None
    if features is None:
        features = CrossInstitutionFeatures(settings, keystore, work_dir_prefix=WORK_DIR_PREFIX)
    try:
        prepare_root(settings, permissions)
        with build_lock(settings, institution_code):
            return _build_locked(settings, keystore, institution_code, sources, classes, policy, token_key,
                                 signing_key, permissions, features, k_override, watermark_key)
    except OSError as error:
        raise _not_writable(settings, error) from error
    finally:
        if own_features:
            features.close()


def _build_locked(settings: Settings, keystore: KeyStore, institution_code: str, sources: list[SourceTable],
                  classes: ColumnClasses, policy: MaskingPolicy, token_key: KeyVersion, signing_key: KeyVersion,
                  permissions: ExtractPermissions, features: CrossInstitutionFeatures,
                  k_override: KOverride | None, watermark_key: KeyVersion) -> ExtractOutcome:
    previous, previous_manifest = _previous_manifest(settings, keystore, institution_code)
    build_id = new_build_id()
    watermark = BuildWatermark.new(institution_code, build_id, watermark_key)
    try:
        build = create_build_dir(settings, institution_code, build_id)
    except OSError as error:
        raise _not_writable(settings, error) from error

    try:
        entries, outcomes = _build_tables(settings, keystore, institution_code, sources, build, classes, policy,
                                          token_key, previous, previous_manifest, watermark)
        feature_table = _build_feature_table(features, institution_code, build, classes, policy, token_key,
                                             previous, previous_manifest, watermark)
        if feature_table is not None:
            entries.append(feature_table[0])
            outcomes.append(feature_table[1])
        k_report = assess(build, entries, policy, settings.extract_k_anonymity, previous_manifest.get("k_anonymity"))
        if (_unchanged(previous, previous_manifest, entries, outcomes, permissions)
                and k_report.matches(previous_manifest.get("k_anonymity"))):
            discard_build(build)
            logger.info("extract of %s unchanged, build %s kept", institution_code, previous)
            return ExtractOutcome(institution_code, "unchanged", previous, previous_manifest["build_id"],
                                  policy.name, policy.version, policy.sm3, token_key.label,
                                  sm3_file(previous / MANIFEST_NAME), tuple(outcomes),
                                  previous_manifest["k_anonymity"])
        # Below k and no override: raises, and the handler below deletes the build.
        override = enforce(institution_code, k_report, k_override)
        if override is not None:
            logger.warning("extract %s of %s published below k=%s by override of %s: %s", build_id, institution_code,
                           k_report.k, override["actor"], ", ".join(override["tables"]))
        for entry in entries:
            permissions.apply(build / entry["file"], is_dir=False)
        manifest_path = build / MANIFEST_NAME
        document = _manifest(institution_code, build_id, policy, token_key, signing_key, entries)
        document["k_anonymity"] = k_report.manifest_entry(override)
        # Registered before publication, so every published build can be identified.
        document["watermark"] = watermark.manifest_entry()
        register_build(settings, watermark, document)
        _write_json(document, manifest_path, permissions)
        permissions.apply(sign_file(keystore, manifest_path, kind=MANIFEST_SIGNATURE_KIND), is_dir=False)
        permissions.apply(build, is_dir=True)
        write_trusted_keys(settings, keystore)
        publish(settings, institution_code, build)
    except OSError as error:
        discard_build(build)
        raise ExtractWriteFailed(
            "EXTRACT_WRITE_FAILED",
            f"生成机构 {institution_code} 的数据提取时读写 {error.filename or build} 失败（{error.strerror}），"
            "未发布新的数据提取，原有提取保持不变。请检查磁盘空间和目录权限后重试。",
        ) from error
    except BaseException:
        discard_build(build)
        raise

    logger.info("published extract %s of %s: tables %s, policy v%s, token key %s, group %s", build_id,
                institution_code, ", ".join(f"{item.name}({item.rows})" for item in outcomes), policy.version,
                token_key.label, permissions.group_name)
    return ExtractOutcome(institution_code, "published", build, build_id, policy.name, policy.version, policy.sm3,
                          token_key.label, sm3_file(build / MANIFEST_NAME), tuple(outcomes), document["k_anonymity"])


def _verified(settings: Settings, keystore: KeyStore, policy: MaskingPolicy | None) -> MaskingPolicy:
    """Return the policy after verifying its signature again, or the newest approved one.

    Without an approved policy this raises ``POLICY_NOT_APPROVED``. A build never approves a
    policy itself, so every approval is a person's act: the console's four-eyes approval, or an
    operator's ``python -m extracts policy approve``.
    """
    if policy is None:
        return load_approved_policy(settings, keystore)
    if policy.path is None or policy.signature_key is None:
        raise PolicyNotApproved(
            "POLICY_NOT_APPROVED",
            f"脱敏策略 {policy.name} 第 {policy.version} 版未经审批签名，不能用于生成数据提取。请先审批（python -m extracts policy approve）。",
        )
    verified = verified_policy(policy.path, keystore)
    if verified.sm3 != policy.sm3:
        raise PolicyNotApproved("POLICY_SIGNATURE_INVALID", f"脱敏策略文件 {policy.path} 在加载后被修改，拒绝使用。")
    return verified


def build_extract(
    settings: Settings, institution_code: str, unix_group: str | None = None, *, keystore: KeyStore | None = None,
    classes: ColumnClasses | None = None, policy: MaskingPolicy | None = None,
) -> Path:
    """Build the extract of one institution (see :func:`build_institution`) and return its published folder."""
    outcome = build_institution(settings, institution_code, classes=classes, policy=policy, unix_group=unix_group,
                                keystore=keystore)
    return extract_dir(settings, outcome.institution)


def build_all(
    settings: Settings, unix_group_prefix: str | None = None, *, keystore: KeyStore | None = None,
    classes: ColumnClasses | None = None, policy: MaskingPolicy | None = None,
) -> dict[str, ExtractOutcome | RegsandboxError]:
    """Build the extract of every institution in the warehouse; the group is ``<prefix><code>``.

    One institution's failure does not stop the others: its entry is the error, for the caller to
    report and audit.
    """
    codes = warehouse_codes(settings)
    if not codes:
        raise WarehouseMissingError(
            "WAREHOUSE_EMPTY",
            f"数据仓库 {settings.warehouse_dir} 中没有数据。请先审核通过报送数据，或运行 `python -m extracts load-demo` 导入演示数据。",
        )
    if keystore is None:
        keystore = open_keystore(settings)
    # Verified once per run, because reading and parsing the policy file again for each institution
    # cost about 75 ms per institution in a profile of benchmarks/extract_rebuild.py.
    policy = _verified(settings, keystore, policy)
    results: dict[str, ExtractOutcome | RegsandboxError] = {}
    # The cross-institution features are computed once for all institutions, not once for each.
    with CrossInstitutionFeatures(settings, keystore, work_dir_prefix=WORK_DIR_PREFIX) as features:
        for code in codes:
            group = f"{unix_group_prefix}{code}" if unix_group_prefix is not None else None
            try:
                results[code] = _build_institution(settings, code, classes=classes, policy=policy,
                                                   policy_verified=True, unix_group=group, keystore=keystore,
                                                   accepted_ids=None, features=features, k_override=None)
            except RegsandboxError as error:
                logger.error("extract of %s not built: %s", code, error)
                results[code] = error
    return results
