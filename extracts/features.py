"""Cross-institution features about each institution's own corporate customers (跨机构客户特征).

The extract of institution X gains one table, :data:`FEATURES_TABLE`, with one row per corporate
customer of X, with aggregates of the accepted report data that the *other* institutions hold about
that customer. The features are computed once per build run over the whole warehouse, then sliced per
institution. A row never names another institution or another institution's customer. It contains
X's customer number and feature values only. The customer number ``KHTYBH`` gets the treatment
it gets in X's 对公客户信息表: an HMAC-SM3 token under X's tokenisation key, or the value itself
when the policy keeps that column.

Inputs
    For every institution, the newest accepted period of four EAST templates: 对公客户信息表
    (EAST_DGKHXXB), 信贷合同表 (EAST_XDHTB), 对公信贷业务借据表 (EAST_DGXDYWJJB) and 担保合同表
    (EAST_DBHTB). Each template is a snapshot at the end of its period, so the newest period is
    the current state. Institutions may have reached different periods, and each contributes its
    newest one. NOTE: every partition with a manifest is read, as :func:`extracts.builder.build_all`
    reads them, so a partition whose acceptance was not committed counts until
    :func:`intake.warehouse.recover_interrupted_loads` settles it.

Customer identity across institutions
    ``KHTYBH`` is internal to each institution. Institutions share the customer's certificate:
    证件类型 and 证件号码 (``ZJLX``/``ZJHM``; ``DBRZJLX``/``DBRZJHM`` for a guarantor). Only the
    code types 01 统一社会信用代码 and 02 组织机构代码 are matched, because only they are unique
    nationwide. Both code lists (对公证件类型 and 担保人证件类型) use 01 and 02 for them. The
    identity is ``<type>:<upper-cased number>``. The two types are not matched with each other.
    A customer of X whose certificate has another type gets no row. X's customers are the
    ``KHTYBH`` of X's newest 对公客户信息表 and 借据表. The certificate in the customer table
    wins when the two tables disagree.

Features (a lender of a customer is an institution with a valid (``HTZT`` 01) contract or a loan
that is not settled or sold (``DKZT`` not 04/06) for that customer)
    - ``other_lender_count`` (他行授信机构数, 多头借贷): number of lenders of the customer other than X.
    - ``other_contract_amount`` (他行有效授信合同金额): sum of ``HTJE`` of the valid CNY contracts at
      other institutions, in yuan.
    - ``other_loan_balance`` (他行贷款余额): sum of ``JJYE`` of the CNY loans (not settled or sold)
      at other institutions, in yuan. Foreign-currency contracts and loans are left out of both
      sums, because the warehouse has no exchange rates.
    - ``other_overdue`` (他行逾期): some other institution reports a loan of the customer with
      ``DKZT`` 02 (逾期) or ``YQTS`` (逾期天数) above 0.
    - ``other_nonperforming`` (他行不良): some other institution reports a loan of the customer
      classified 03 次级, 04 可疑 or 05 损失 (``WJFL``).
    - ``guarantee_circle`` (担保圈): the customer lies on a cycle of the guarantor -> borrower
      graph, built from the valid guarantee contracts (``DBHTZT`` 01) of all institutions: the
      guarantor's certificate, and the borrower of each contract in ``BDBHTH`` through 信贷合同表
      and 对公客户信息表 of the same institution. A guarantor that guarantees itself (for example
      a borrower pledging its own property) adds no edge.

Contributors and suppression (k = setting ``extract_feature_min_contributors``, default 5)
    An aggregate is published only when the number of other institutions it is built from is 0 or
    at least k, and is NULL otherwise. The guarantee circle flag is the exception described
    below. The contributors of each feature are:

    - lender count: the other lenders. Each of them contributes one fact, that it lends to the
      customer, so a count of 1 is one institution's data even though it names none. It follows
      the same rule: NULL means 1 to k-1 other lenders. A count of 0 is published, because it
      contains no amount and whether the customer borrows elsewhere at all is the point of 多头借贷.
    - each sum: the other institutions holding at least one contract (loan) in the sum. A sum
      over no contributor is 0.
    - ``other_overdue`` and ``other_nonperforming``: every other institution with a loan of the
      customer, not only those reporting the overdue, because "no overdue" is their data too. The
      suppression depends only on how many institutions report loans, never on the flag's value,
      so a NULL says nothing about an overdue. With no other loan the flag is false.
    - ``guarantee_circle``: the other institutions that report an edge of the customer's strongly
      connected component (every edge of that component lies on some cycle through the
      customer). The value is true when that component has edges from at least k other
      institutions, or when X's own guarantee contracts alone already form a cycle through the
      customer, because X can see that in its own data. In every other case it is NULL, both when there is no
      circle and when the circle is suppressed. A false value would turn every suppressed circle
      into a visible one.

Differencing
    An institution must not learn one other institution's value by combining features. No
    published figure includes X's own contribution, so X cannot subtract its own value from a
    total. Two sums over sets that differ by one institution would reveal that institution's value,
    but the features contain no such pair: the two sums measure different quantities (contract
    amounts, loan balances), and an exact lender count is only published at k or more. Every
    customer of X has its own aggregates, with nothing shared between rows.

    NOTE: two kinds of differencing remain that k alone cannot stop. Successive builds are
    snapshots: when one lender joins or leaves a customer's set of at least k lenders between
    two builds, and the others' amounts do not change, the difference of the sums is that lender's
    amount. Institutions that pool their extracts can subtract what they know together.
    Noise or rounding of the sums would be needed against both. An institution can also report a
    company as its customer, or a guarantee, to learn that company's features, which the review
    of its reports has to catch. The answers are still aggregates over k or more other institutions.

The whole-warehouse feature set, with raw customer numbers, exists only as a Parquet file in a
private work folder (0700) below the warehouse, which :meth:`CrossInstitutionFeatures.close`
deletes. The work folder has the builder's prefix, so a build that was killed leaves nothing that
the next build does not delete. Decryption, the DuckDB spill files and the graph all stay there.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from catalog.classes import ColumnClass, effective_class
from extracts.masking import TOKEN_TABLE, ColumnPlan, quote_identifier, quote_literal, select_sql, token_dictionary
from extracts.policy import MaskingPolicy
from extracts.sources import ExtractSourceError, SourceTable, decrypt_intake, intake_tables
from intake import warehouse as intake_warehouse
from regsandbox_core.crypto import sm3_hex
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

__all__ = ["FEATURES_TABLE", "FEATURE_COLUMNS", "CrossInstitutionFeatures", "FeatureColumn"]

logger = logging.getLogger(__name__)

FEATURES_TABLE = "cross_institution_features"
FEATURES_FORMAT = "regsandbox-features/1"
SOURCE_FEATURES = "features"

CUSTOMERS = "EAST_DGKHXXB"
CONTRACTS = "EAST_XDHTB"
LOANS = "EAST_DGXDYWJJB"
GUARANTEES = "EAST_DBHTB"
INPUT_TEMPLATES = (CUSTOMERS, CONTRACTS, LOANS, GUARANTEES)
KEY_COLUMN = "KHTYBH"
KEY_TOKEN_RULE = "features-key-token"
"""Rule id recorded when the key is tokenised because the policy neither keeps nor tokenises ``KHTYBH``."""

IDENTITY_TYPES = ("01", "02")
"""统一社会信用代码 and 组织机构代码, the certificate types that are unique nationwide."""
VALID_STATE = "01"
CLOSED_LOAN_STATES = ("04", "06")
OVERDUE_LOAN_STATE = "02"
NONPERFORMING_GRADES = ("03", "04", "05")
SUM_CURRENCY = "CNY"

# Columns read from each input template. A partition that lacks one (an older template version) gives NULL.
_INPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    CUSTOMERS: ("KHTYBH", "ZJLX", "ZJHM"),
    CONTRACTS: ("HTH", "KHTYBH", "BZ", "HTJE", "HTZT"),
    LOANS: ("KHTYBH", "ZJLX", "ZJHM", "BZ", "JJYE", "DKZT", "YQTS", "WJFL"),
    GUARANTEES: ("BDBHTH", "DBRZJLX", "DBRZJHM", "DBHTZT"),
}
_INPUT_TABLES = {CUSTOMERS: "customers_in", CONTRACTS: "contracts_in", LOANS: "loans_in", GUARANTEES: "guarantees_in"}

CROSS_INSTITUTION_CLASS = ColumnClass(level=3, pi_category=None, kind="other")
CROSS_INSTITUTION_AMOUNT_CLASS = ColumnClass(level=3, pi_category=None, kind="amount")
# Level 3 (敏感) in our reading of JR/T 0197-2020: credit information about a corporate customer
# gathered from other institutions, whose leak harms the customer and those institutions. The
# customers are organisations, so no JR/T 0171 personal-information category applies.


@dataclass(frozen=True)
class FeatureColumn:
    """One feature column: name, Chinese label, class and the meaning of NULL (``{k}`` stands for k)."""

    name: str
    label: str
    column_class: ColumnClass
    null_meaning: str


FEATURE_COLUMNS: tuple[FeatureColumn, ...] = (
    FeatureColumn("other_lender_count", "他行授信机构数（多头借贷）", CROSS_INSTITUTION_CLASS,
                  "有他行授信，但授信机构少于 {k} 家，已屏蔽"),
    FeatureColumn("other_contract_amount", "他行有效授信合同金额合计（人民币元）", CROSS_INSTITUTION_AMOUNT_CLASS,
                  "有人民币有效合同的他行不为 0 但少于 {k} 家，已屏蔽"),
    FeatureColumn("other_loan_balance", "他行贷款余额合计（人民币元）", CROSS_INSTITUTION_AMOUNT_CLASS,
                  "有人民币贷款（已结清、已转让的除外）的他行不为 0 但少于 {k} 家，已屏蔽"),
    FeatureColumn("other_overdue", "他行贷款逾期", CROSS_INSTITUTION_CLASS,
                  "有贷款（已结清、已转让的除外）的他行不为 0 但少于 {k} 家，已屏蔽；是否屏蔽与是否逾期无关"),
    FeatureColumn("other_nonperforming", "他行贷款五级分类为不良（次级、可疑、损失）", CROSS_INSTITUTION_CLASS,
                  "有贷款（已结清、已转让的除外）的他行不为 0 但少于 {k} 家，已屏蔽；是否屏蔽与是否不良无关"),
    FeatureColumn("guarantee_circle", "担保圈成员", CROSS_INSTITUTION_CLASS,
                  "未发现经过该客户、且由本机构自身担保合同构成或含至少 {k} 家他行担保合同的担保圈：可能不在担保圈中，"
                  "也可能所在担保圈的他行少于 {k} 家而被屏蔽；"
                  "本表不使用 false，以免屏蔽本身暴露担保圈"),
)


class FeatureInputError(ExtractSourceError):
    """The cross-institution features could not be computed: an input partition did not decrypt, or DuckDB failed."""


# --- the run ----------------------------------------------------------------------------------------


class CrossInstitutionFeatures:
    """The feature set of one build run: inputs listed once, computed at most once, sliced per institution.

    Use it as a context manager, or call :meth:`close`, which deletes the private work folder with
    the decrypted inputs and the raw feature set. Listing the inputs reads partition manifests only.
    The features are computed on the first :meth:`write_table`, so a run in which every
    institution's features are unchanged decrypts nothing.
    """

    def __init__(self, settings: Settings, keystore: KeyStore, *, work_dir_prefix: str) -> None:
        self._settings = settings
        self._keystore = keystore
        self._work_dir_prefix = work_dir_prefix
        self.min_contributors = settings.extract_feature_min_contributors
        self._inputs: dict[tuple[str, str], SourceTable] | None = None
        self._work_dir: Path | None = None
        self._result: Path | None = None
        self._error: RegsandboxError | None = None

    def __enter__(self) -> CrossInstitutionFeatures:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the work folder with the decrypted inputs and the raw feature set."""
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
            self._result = None

    # --- inputs ---

    def _input_tables(self) -> dict[tuple[str, str], SourceTable]:
        """Return (template, institution) -> the table with only its newest accepted partition."""
        if self._inputs is not None:
            return self._inputs
        root = self._settings.warehouse_dir / intake_warehouse.INTAKE_TABLE_DIR
        codes = sorted({folder.name.split("=", 1)[1] for template in INPUT_TEMPLATES
                        for folder in (root / template).glob("institution=*") if folder.is_dir()})
        inputs = {}
        for code in codes:
            for table in intake_tables(self._settings, code):
                if table.catalog_table in INPUT_TEMPLATES:
                    newest = max(table.partitions, key=lambda partition: partition.period or "")
                    inputs[(table.catalog_table, code)] = replace(table, partitions=(newest,))
        self._inputs = inputs
        return inputs

    def has_customers(self, institution_code: str) -> bool:
        """Tell whether the institution reported corporate customers or loans, so that its extract gets the table."""
        inputs = self._input_tables()
        return (CUSTOMERS, institution_code) in inputs or (LOANS, institution_code) in inputs

    def fingerprint_inputs(self, plans: list[ColumnPlan]) -> dict:
        """Return what the table depends on besides policy and token key: every input partition, k and the plans."""
        partitions = [[template, code, table.partitions[0].manifest_entry()]
                      for (template, code), table in sorted(self._input_tables().items())]
        return {
            "features": FEATURES_FORMAT,
            "min_contributors": self.min_contributors,
            "warehouse": sm3_hex(json.dumps(partitions, sort_keys=True).encode("utf-8")),
            "columns": [plan.manifest_entry() for plan in plans],
        }

    def source_table(self) -> SourceTable:
        """Return the table's description for the manifest: no partitions, since they belong to every institution."""
        return SourceTable(FEATURES_TABLE, FEATURES_TABLE, SOURCE_FEATURES, ())

    def manifest_entry(self) -> dict:
        """Return the block that explains the table to modellers: k and the meaning of each column and of NULL."""
        k = self.min_contributors
        return {
            "format": FEATURES_FORMAT,
            "min_contributors": k,
            "key": KEY_COLUMN,
            "description": "本机构对公客户在其他机构的授信、逾期和担保圈情况，按数据仓库中各机构最新一期已审核通过的报送数据计算；"
                           "授信机构指有有效信贷合同或有贷款（已结清、已转让的除外）的机构。"
                           f"不含任何其他机构的名称或客户。基于少于 {k} 家其他机构的汇总值不公布（为 NULL）。",
            "columns": {column.name: {"label": column.label, "null_meaning": column.null_meaning.format(k=k)}
                        for column in FEATURE_COLUMNS},
        }

    # --- column plans ---

    @staticmethod
    def column_plans(classes: Mapping[tuple[str, str], ColumnClass], policy: MaskingPolicy) -> list[ColumnPlan]:
        """Return the plans of the key and the feature columns.

        The key gets the class and the treatment of ``KHTYBH`` in X's 对公客户信息表, so that it
        joins with that table. When the policy neither keeps nor tokenises that column, the key is
        tokenised: a masked or generalised key would join wrong rows, and a dropped one none.
        """
        key_class = classes.get((CUSTOMERS, KEY_COLUMN))
        classified = key_class is not None
        key_class = key_class or effective_class(None, None)
        rule = policy.rule_for(key_class)
        if rule.treatment in ("keep", "token"):
            key_plan = ColumnPlan.from_rule(KEY_COLUMN, key_class, classified, rule)
        else:
            key_plan = ColumnPlan(KEY_COLUMN, key_class, classified, KEY_TOKEN_RULE, "token")
        feature_plans = [ColumnPlan.from_rule(column.name, column.column_class, True, policy.rule_for(column.column_class))
                         for column in FEATURE_COLUMNS]
        return [key_plan, *feature_plans]

    # --- per institution ---

    def write_table(self, institution_code: str, target: Path, plans: list[ColumnPlan], token_key: bytes) -> None:
        """Write the institution's rows of the feature set to ``target``, masked by ``plans``, sorted by key."""
        result = self._computed()
        con = duckdb.connect(":memory:")
        try:
            con.sql(f"SET temp_directory={quote_literal(str(self._work_dir / 'spill'))}")
            columns = ", ".join(quote_identifier(name) for name in [KEY_COLUMN, *(column.name for column in FEATURE_COLUMNS)])
            con.sql(f"CREATE VIEW source AS SELECT {columns} FROM read_parquet({quote_literal(str(result))}) "
                    f"WHERE institution = {quote_literal(institution_code)}")
            token_columns = [plan.name for plan in plans if plan.treatment == "token"]
            con.register(TOKEN_TABLE, token_dictionary(con, "source", token_columns, token_key))
            # Sorted by the key (kept or tokenised, never dropped) so that equal inputs give an equal file.
            query = select_sql(plans, "source")
            con.sql(f"COPY (SELECT * FROM ({query}) ORDER BY {quote_identifier(KEY_COLUMN)}) "
                    f"TO {quote_literal(str(target))} (FORMAT parquet, COMPRESSION zstd)")
        finally:
            con.close()

    # --- the whole-warehouse computation ---

    def _computed(self) -> Path:
        """Return the raw feature set of every institution, computing it on the first call of the run."""
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            self._result = self._compute()
        except RegsandboxError as error:
            self._error = error
            raise
        return self._result

    def _compute(self) -> Path:
        work_root = self._settings.warehouse_dir
        work_root.mkdir(parents=True, exist_ok=True)
        self._work_dir = Path(tempfile.mkdtemp(prefix=f"{self._work_dir_prefix}features-", dir=work_root))
        inputs = self._work_dir / "inputs"
        result = self._work_dir / "features.parquet"
        try:
            files = self._decrypt_inputs(inputs)
            rows, institutions = self._compute_from(files, result)
        except (duckdb.Error, OSError) as error:
            # Paths of the work folder name other institutions, so the message shows only the error type.
            logger.exception("cross-institution features not computed")
            raise FeatureInputError(
                "EXTRACT_FEATURES_FAILED",
                f"计算跨机构客户特征失败（{type(error).__name__}），未生成数据提取，原有提取保持不变。"
                "请检查数据仓库所在磁盘的空间和权限后重试；问题持续时请联系平台管理员查看日志。",
            ) from error
        finally:
            # The decrypted inputs are not needed once the feature set is written.
            shutil.rmtree(inputs, ignore_errors=True)
        logger.info("cross-institution features computed: %s customers of %s institutions, k=%s",
                    rows, institutions, self.min_contributors)
        return result

    def _compute_from(self, files: dict[str, list[tuple[Path, str]]], result: Path) -> tuple[int, int]:
        """Write the raw feature set of every institution to ``result``; return its rows and institutions."""
        con = duckdb.connect(":memory:")
        try:
            con.sql(f"SET temp_directory={quote_literal(str(self._work_dir / 'spill'))}")
            for template in INPUT_TEMPLATES:
                _load_input(con, _INPUT_TABLES[template], _INPUT_COLUMNS[template], files.get(template, []))
            con.sql(_RELATIONSHIPS_SQL)
            _guarantee_circles(con, self.min_contributors)
            con.sql(f"COPY ({_FEATURES_SQL.format(k=int(self.min_contributors))}) TO {quote_literal(str(result))} "
                    "(FORMAT parquet, COMPRESSION zstd)")
            (rows, institutions) = con.sql(f"SELECT count(*), count(DISTINCT institution) FROM read_parquet("
                                           f"{quote_literal(str(result))})").fetchall()[0]
        finally:
            con.close()
        return rows, institutions

    def _decrypt_inputs(self, folder: Path) -> dict[str, list[tuple[Path, str]]]:
        """Decrypt every input partition into ``folder`` and return template -> [(file, institution)]."""
        files: dict[str, list[tuple[Path, str]]] = {}
        failed = 0
        for (template, code), table in sorted(self._input_tables().items()):
            target_dir = folder / code
            target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                (path,) = decrypt_intake(self._keystore, code, table, target_dir)
            except ExtractSourceError as error:
                failed += 1
                logger.error("cross-institution features: partition %s not readable: %s", table.partitions[0].path,
                             error.code)
                continue
            files.setdefault(template, []).append((path, code))
        if failed:
            # The message reaches the operator of every institution's build, so it names no institution.
            raise FeatureInputError(
                "EXTRACT_FEATURE_PARTITION_UNREADABLE",
                f"计算跨机构客户特征时，数据仓库中有 {failed} 个分区无法解密或读取，未生成数据提取，原有提取保持不变。"
                "请平台管理员在日志中查看这些分区的路径，检查相应机构的数据密钥状态，或重新审核通过该期报送。",
            )
        return files


def _load_input(con: duckdb.DuckDBPyConnection, name: str, columns: tuple[str, ...],
                files: list[tuple[Path, str]]) -> None:
    """Create table ``name`` (institution, columns as trimmed text) from the decrypted partitions of one template."""
    definition = ", ".join(f"{quote_identifier(column)} VARCHAR" for column in columns)
    con.sql(f"CREATE TABLE {name} (institution VARCHAR, {definition})")
    if not files:
        return
    con.sql("CREATE OR REPLACE TEMP TABLE file_institution (filename VARCHAR, institution VARCHAR)")
    con.executemany("INSERT INTO file_institution VALUES (?, ?)", [[str(path), code] for path, code in files])
    listing = "[" + ", ".join(quote_literal(str(path)) for path, _code in files) + "]"
    present = {row[0] for row in con.sql(f"DESCRIBE SELECT * FROM read_parquet({listing}, union_by_name=true)").fetchall()}
    selected = ", ".join(
        f"NULLIF(trim(CAST(r.{quote_identifier(column)} AS VARCHAR)), '')" if column in present else "NULL"
        for column in columns
    )
    con.sql(f"INSERT INTO {name} SELECT f.institution, {selected} FROM read_parquet({listing}, union_by_name=true, "
            "filename=true) AS r JOIN file_institution AS f ON f.filename = r.filename")


# Relationships of each institution with each customer identity. ``own`` maps an institution's
# customer numbers to identities; ``relationships`` has one row per lender and identity.
_IDENTITY = f"CASE WHEN {{type}} IN {IDENTITY_TYPES} AND {{number}} IS NOT NULL THEN {{type}} || ':' || upper({{number}}) END"
_AMOUNT = "TRY_CAST(replace({value}, ',', '') AS DECIMAL(38,2))"

_RELATIONSHIPS_SQL = f"""
CREATE TABLE own AS
SELECT institution, customer_no, arg_min(identity, rank) AS identity
FROM (
    SELECT institution, KHTYBH AS customer_no, {_IDENTITY.format(type="ZJLX", number="ZJHM")} AS identity, 0 AS rank
    FROM customers_in
    UNION ALL
    SELECT institution, KHTYBH, {_IDENTITY.format(type="ZJLX", number="ZJHM")}, 1 FROM loans_in
)
WHERE customer_no IS NOT NULL AND identity IS NOT NULL
GROUP BY institution, customer_no;

CREATE TABLE contract_links AS
SELECT c.institution, c.HTH AS contract_no, o.identity, c.BZ AS currency, {_AMOUNT.format(value="c.HTJE")} AS amount
FROM contracts_in AS c JOIN own AS o ON o.institution = c.institution AND o.customer_no = c.KHTYBH
WHERE c.HTZT = '{VALID_STATE}';

CREATE TABLE loan_links AS
SELECT l.institution, coalesce({_IDENTITY.format(type="l.ZJLX", number="l.ZJHM")}, o.identity) AS identity,
       l.BZ AS currency, {_AMOUNT.format(value="l.JJYE")} AS balance,
       l.DKZT = '{OVERDUE_LOAN_STATE}' OR coalesce(TRY_CAST(l.YQTS AS BIGINT), 0) > 0 AS overdue,
       l.WJFL IN {NONPERFORMING_GRADES} AS nonperforming
FROM loans_in AS l LEFT JOIN own AS o ON o.institution = l.institution AND o.customer_no = l.KHTYBH
WHERE coalesce(l.DKZT, '') NOT IN {CLOSED_LOAN_STATES};

CREATE TABLE relationships AS
SELECT institution, identity,
       coalesce(c.contract_sum, 0) AS contract_sum, coalesce(c.has_contract, false) AS has_contract,
       coalesce(l.balance_sum, 0) AS balance_sum, coalesce(l.has_balance, false) AS has_balance,
       l.identity IS NOT NULL AS has_loan,
       coalesce(l.overdue, false) AS overdue, coalesce(l.nonperforming, false) AS nonperforming
FROM (
    SELECT institution, identity, sum(amount) FILTER (WHERE currency = '{SUM_CURRENCY}') AS contract_sum,
           coalesce(bool_or(currency = '{SUM_CURRENCY}'), false) AS has_contract
    FROM contract_links GROUP BY institution, identity
) AS c
FULL JOIN (
    SELECT institution, identity,
           sum(balance) FILTER (WHERE currency = '{SUM_CURRENCY}') AS balance_sum,
           coalesce(bool_or(currency = '{SUM_CURRENCY}'), false) AS has_balance,
           bool_or(overdue) AS overdue, bool_or(nonperforming) AS nonperforming
    FROM loan_links WHERE identity IS NOT NULL GROUP BY institution, identity
) AS l USING (institution, identity);

CREATE TABLE totals AS
SELECT identity, count(*) AS lenders,
       count(*) FILTER (WHERE has_contract) AS contract_n, sum(contract_sum) AS contract_sum,
       count(*) FILTER (WHERE has_balance) AS balance_n, sum(balance_sum) AS balance_sum,
       count(*) FILTER (WHERE has_loan) AS loan_n,
       count(*) FILTER (WHERE overdue) AS overdue_n, count(*) FILTER (WHERE nonperforming) AS nonperforming_n
FROM relationships GROUP BY identity;
"""

# Totals of the other institutions: the identity's totals minus the institution's own relationship.
# Each aggregate is published when its contributors number 0 or at least k (see the module docstring).
_FEATURES_SQL = """
WITH others AS (
    SELECT o.institution, o.customer_no, o.identity,
           coalesce(t.lenders, 0) - (r.identity IS NOT NULL)::BIGINT AS lender_n,
           coalesce(t.contract_n, 0) - coalesce(r.has_contract::BIGINT, 0) AS contract_n,
           coalesce(t.contract_sum, 0) - coalesce(r.contract_sum, 0) AS contract_sum,
           coalesce(t.balance_n, 0) - coalesce(r.has_balance::BIGINT, 0) AS balance_n,
           coalesce(t.balance_sum, 0) - coalesce(r.balance_sum, 0) AS balance_sum,
           coalesce(t.loan_n, 0) - coalesce(r.has_loan::BIGINT, 0) AS loan_n,
           coalesce(t.overdue_n, 0) - coalesce(r.overdue::BIGINT, 0) AS overdue_n,
           coalesce(t.nonperforming_n, 0) - coalesce(r.nonperforming::BIGINT, 0) AS nonperforming_n
    FROM own AS o
    LEFT JOIN totals AS t ON t.identity = o.identity
    LEFT JOIN relationships AS r ON r.institution = o.institution AND r.identity = o.identity
)
SELECT o.institution, o.customer_no AS KHTYBH,
       CASE WHEN lender_n = 0 OR lender_n >= {k} THEN lender_n END AS other_lender_count,
       CASE WHEN contract_n = 0 THEN 0 WHEN contract_n >= {k} THEN contract_sum END::DECIMAL(38,2) AS other_contract_amount,
       CASE WHEN balance_n = 0 THEN 0 WHEN balance_n >= {k} THEN balance_sum END::DECIMAL(38,2) AS other_loan_balance,
       CASE WHEN loan_n = 0 THEN false WHEN loan_n >= {k} THEN overdue_n > 0 END AS other_overdue,
       CASE WHEN loan_n = 0 THEN false WHEN loan_n >= {k} THEN nonperforming_n > 0 END AS other_nonperforming,
       CASE WHEN c.member THEN true END AS guarantee_circle
FROM others AS o
LEFT JOIN circle_members AS c ON c.institution = o.institution AND c.identity = o.identity
ORDER BY o.institution, o.customer_no
"""

_EDGES_SQL = f"""
CREATE TABLE edges AS
SELECT DISTINCT g.institution, g.guarantor, o.identity AS borrower
FROM (
    SELECT institution, guarantor, NULLIF(trim(contract_no), '') AS contract_no
    FROM (
        SELECT institution, {_IDENTITY.format(type="DBRZJLX", number="DBRZJHM")} AS guarantor,
               unnest(string_split(BDBHTH, ';')) AS contract_no
        FROM guarantees_in WHERE DBHTZT = '{VALID_STATE}'
    )
) AS g
JOIN contracts_in AS c ON c.institution = g.institution AND c.HTH = g.contract_no AND c.HTZT = '{VALID_STATE}'
JOIN own AS o ON o.institution = c.institution AND o.customer_no = c.KHTYBH
WHERE g.guarantor IS NOT NULL AND g.guarantor <> o.identity
"""


def _strong_components(sources: np.ndarray, targets: np.ndarray, node_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the strongly connected component of every node and the size of every component."""
    if node_count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)), shape=(node_count, node_count)).tocsr()
    _count, labels = connected_components(graph, directed=True, connection="strong")
    return labels, np.bincount(labels)


def _guarantee_circles(con: duckdb.DuckDBPyConnection, min_contributors: int) -> None:
    """Create ``circle_members`` (institution, identity, member): the customers whose circle flag is true.

    Two graphs are searched. In the whole graph, a node in a component of two or more nodes lies
    on a cycle. The contributors of that node are the institutions that report an edge inside its
    component. In the graph of each institution's own edges (nodes are institution and identity
    pairs), a node in such a component lies on a cycle that the institution's contracts alone form.
    """
    con.sql(_EDGES_SQL)
    con.sql("CREATE TABLE nodes AS SELECT identity, (row_number() OVER (ORDER BY identity) - 1)::BIGINT AS node "
            "FROM (SELECT guarantor AS identity FROM edges UNION SELECT borrower FROM edges)")
    con.sql("CREATE TABLE own_nodes AS SELECT institution, identity, "
            "(row_number() OVER (ORDER BY institution, identity) - 1)::BIGINT AS node FROM "
            "(SELECT institution, guarantor AS identity FROM edges UNION SELECT institution, borrower FROM edges)")
    arrays = con.sql("SELECT g.node AS g, b.node AS b, og.node AS own_g, ob.node AS own_b FROM edges AS e "
                     "JOIN nodes AS g ON g.identity = e.guarantor JOIN nodes AS b ON b.identity = e.borrower "
                     "JOIN own_nodes AS og ON og.institution = e.institution AND og.identity = e.guarantor "
                     "JOIN own_nodes AS ob ON ob.institution = e.institution AND ob.identity = e.borrower").fetchnumpy()
    (node_count,) = con.sql("SELECT count(*) FROM nodes").fetchall()[0]
    (own_count,) = con.sql("SELECT count(*) FROM own_nodes").fetchall()[0]
    labels, sizes = _strong_components(arrays["g"], arrays["b"], node_count)
    own_labels, own_sizes = _strong_components(arrays["own_g"], arrays["own_b"], own_count)
    con.register("components", pa.table({"node": np.arange(node_count, dtype=np.int64),
                                         "label": labels.astype(np.int64), "size": sizes[labels].astype(np.int64)}))
    con.register("own_components", pa.table({"node": np.arange(own_count, dtype=np.int64),
                                             "size": own_sizes[own_labels].astype(np.int64)}))
    con.sql(f"""
    CREATE TABLE circle_members AS
    WITH component_institutions AS (
        SELECT DISTINCT cg.label, e.institution
        FROM edges AS e
        JOIN nodes AS g ON g.identity = e.guarantor JOIN components AS cg ON cg.node = g.node
        JOIN nodes AS b ON b.identity = e.borrower JOIN components AS cb ON cb.node = b.node
        WHERE cg.label = cb.label
    ),
    contributors AS (SELECT label, count(*) AS institutions FROM component_institutions GROUP BY label),
    whole AS (
        SELECT o.institution, o.identity,
               c.size >= 2 AND coalesce(k.institutions, 0) - (ci.label IS NOT NULL)::BIGINT
                   >= {int(min_contributors)} AS member
        FROM (SELECT DISTINCT institution, identity FROM own) AS o
        JOIN nodes AS n ON n.identity = o.identity JOIN components AS c ON c.node = n.node
        LEFT JOIN contributors AS k ON k.label = c.label
        LEFT JOIN component_institutions AS ci ON ci.label = c.label AND ci.institution = o.institution
    ),
    alone AS (
        SELECT n.institution, n.identity, c.size >= 2 AS member
        FROM own_nodes AS n JOIN own_components AS c ON c.node = n.node
    )
    SELECT institution, identity, bool_or(member) AS member
    FROM (SELECT * FROM whole UNION ALL SELECT * FROM alone)
    GROUP BY institution, identity
    HAVING bool_or(member)
    """)
