"""k-anonymity of masked extract tables over the quasi-identifiers that the masking policy declares.

The records of a table fall into equivalence classes: records with equal values in every
quasi-identifier column of the masked output (NULL counts as one value). A table is k-anonymous
when every class has at least k records, so no record can be narrowed down to fewer than k by
those columns. The report of each table gives the k used, the number of classes, the smallest
class and the records in classes below k. It is computed over the published Parquet file, so
it describes the values a sandbox user reads.

A table for which the policy declares no quasi-identifier is reported as not assessed and never
blocks publication. A declared column that the policy drops is not in the output and so not
counted. A declared column that the table does not have at all is an error, because a misspelt
declaration would silently weaken the check.

:func:`enforce` raises :class:`KAnonymityBelowError` when a table is below k, unless the caller
passes a :class:`KOverride`. The report and the override are written into the signed manifest.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import duckdb

from extracts.masking import ColumnPlan, quote_identifier, quote_literal
from extracts.policy import MaskingPolicy
from regsandbox_core.errors import RegsandboxError

QUASI_IDENTIFIER_RULE = "quasi_identifiers"
"""Rule id recorded in the manifest for a column generalised as a declared quasi-identifier."""
OVERRIDE_REASON_MAX = 500
"""Maximum length of an override reason, in characters."""


class KAnonymityBelowError(RegsandboxError):
    """A table of the new build has an equivalence class smaller than k and no override was given.

    ``k_anonymity`` contains k and the figures of the tables below k (manifest entries of
    :class:`TableReport`), for the audit event of the refused build and the override form.
    """

    status = 409

    def __init__(self, code: str, message: str, *, k_anonymity: dict[str, Any] | None = None) -> None:
        super().__init__(code, message)
        self.k_anonymity = k_anonymity or {}


class KOverrideInvalid(RegsandboxError):
    """An override without an actor or a reason."""


class QuasiIdentifierMissing(RegsandboxError):
    """The policy declares a quasi-identifier column that the warehouse table does not have."""

    status = 409


@dataclass(frozen=True)
class KOverride:
    """A security admin's decision to publish an extract below k: who decided and why.

    The builder records it in the manifest and in :meth:`ExtractOutcome.audit_detail`. The caller
    checks the role of ``actor`` and writes the audit event.
    """

    actor: str
    reason: str

    def __post_init__(self) -> None:
        actor = self.actor.strip() if isinstance(self.actor, str) else ""
        reason = self.reason.strip() if isinstance(self.reason, str) else ""
        if not actor or len(actor) > 64:
            raise KOverrideInvalid("EXTRACT_K_OVERRIDE_INVALID",
                                   f"强制发布缺少操作人或操作人过长（{self.actor!r}），应为 1–64 个字符的用户名。")
        if not reason or len(reason) > OVERRIDE_REASON_MAX:
            raise KOverrideInvalid(
                "EXTRACT_K_OVERRIDE_INVALID",
                f"强制发布低于 k 匿名要求的数据提取须填写理由（1–{OVERRIDE_REASON_MAX} 个字符），当前理由长度为 {len(reason)}。",
            )
        object.__setattr__(self, "actor", actor)
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True)
class TableReport:
    """The equivalence classes of one table over its quasi-identifier columns."""

    table: str
    sm3: str
    quasi_identifiers: tuple[str, ...]
    rows: int
    classes: int
    min_class_size: int | None
    classes_below_k: int
    records_below_k: int
    dropped_quasi_identifiers: tuple[str, ...] = ()

    @property
    def assessed(self) -> bool:
        return bool(self.quasi_identifiers)

    @property
    def share_below_k(self) -> float:
        return self.records_below_k / self.rows if self.rows else 0.0

    @property
    def below_k(self) -> bool:
        return self.classes_below_k > 0

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "table": self.table, "sm3": self.sm3, "assessed": self.assessed,
            "quasi_identifiers": list(self.quasi_identifiers),
            "dropped_quasi_identifiers": list(self.dropped_quasi_identifiers),
            "rows": self.rows, "classes": self.classes, "min_class_size": self.min_class_size,
            "classes_below_k": self.classes_below_k, "records_below_k": self.records_below_k,
            "share_below_k": round(self.share_below_k, 6),
        }


@dataclass(frozen=True)
class KAnonymityReport:
    """The reports of every table of one build for one k."""

    k: int
    tables: tuple[TableReport, ...]

    def below(self) -> list[TableReport]:
        return [table for table in self.tables if table.below_k]

    def manifest_entry(self, override: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"k": self.k, "passed": not self.below(), "override": None if override is None else dict(override),
                "tables": [table.manifest_entry() for table in self.tables]}

    def matches(self, previous: Mapping[str, Any] | None) -> bool:
        """True when a previous manifest's section reports the same k and the same figures for every table."""
        if not previous or previous.get("k") != self.k:
            return False
        return previous.get("tables") == [table.manifest_entry() for table in self.tables]


def generalise_quasi_identifier(plan: ColumnPlan, policy: MaskingPolicy, table: str) -> ColumnPlan:
    """Return ``plan`` with the column's declared generalisation when its class rule keeps the value.

    Other treatments (token, mask, drop, the rule's own generalisation) stay as the class rule sets them.
    """
    if plan.treatment != "keep":
        return plan
    for declared in policy.quasi_identifiers_of(table):
        if declared.column == plan.name and declared.generalisation() is not None:
            return replace(plan, rule_id=QUASI_IDENTIFIER_RULE, treatment="generalise", bands=declared.bands,
                           quasi_identifier=declared)
    return plan


def measure_table(path: Path, table: str, sm3: str, rows: int, quasi_identifiers: Sequence[str], k: int) -> TableReport:
    """Group the ``rows`` rows of a Parquet file by ``quasi_identifiers`` and count the classes below ``k``."""
    if not quasi_identifiers:
        return TableReport(table, sm3, (), rows, 0, None, 0, 0)
    grouping = ", ".join(quote_identifier(column) for column in quasi_identifiers)
    con = duckdb.connect(":memory:")
    try:
        ((classes, smallest, below, below_records),) = con.sql(
            f"WITH classes AS (SELECT count(*) AS size FROM read_parquet({quote_literal(str(path))}) GROUP BY {grouping}) "
            f"SELECT count(*), min(size), count(*) FILTER (WHERE size < {int(k)}), "
            f"coalesce(sum(size) FILTER (WHERE size < {int(k)}), 0) FROM classes"
        ).fetchall()
    finally:
        con.close()
    return TableReport(table, sm3, tuple(quasi_identifiers), rows, int(classes),
                       None if smallest is None else int(smallest), int(below), int(below_records))


def _quasi_identifier_columns(entry: Mapping[str, Any], policy: MaskingPolicy) -> tuple[list[str], list[str]]:
    """Return the declared quasi-identifiers of a manifest table entry that are published and those dropped."""
    catalog_table = entry["source"]["table"]
    published = [column["name"] for column in entry["columns"]]
    dropped = [column["name"] for column in entry["dropped_columns"]]
    declared = [item.column for item in policy.quasi_identifiers_of(catalog_table)]
    missing = [column for column in declared if column not in published and column not in dropped]
    if missing:
        raise QuasiIdentifierMissing(
            "EXTRACT_QUASI_IDENTIFIER_MISSING",
            f"脱敏策略 {policy.name} 第 {policy.version} 版把 {catalog_table} 的 {'、'.join(missing)} 声明为准标识符，"
            f"但该表没有这些字段，无法评估 k 匿名性，未发布新的数据提取。请在策略的 quasi_identifiers.{catalog_table} "
            "中改正字段代码后重新审批策略。",
        )
    return ([column for column in declared if column in published], [column for column in declared if column in dropped])


def assess(build: Path, entries: Sequence[Mapping[str, Any]], policy: MaskingPolicy, k: int,
           previous: Mapping[str, Any] | None) -> KAnonymityReport:
    """Report every table of ``build`` (its manifest ``entries``) at ``k``.

    A table whose file digest, quasi-identifiers and k equal those in the ``previous`` manifest's
    section is not scanned again: its figures are taken from there.
    """
    known: dict[tuple[str, str, tuple[str, ...]], Mapping[str, Any]] = {}
    if previous and previous.get("k") == k:
        for item in previous.get("tables", []):
            known[(item.get("table"), item.get("sm3"), tuple(item.get("quasi_identifiers", [])))] = item
    reports = []
    for entry in entries:
        published, dropped = _quasi_identifier_columns(entry, policy)
        cached = known.get((entry["name"], entry["sm3"], tuple(published)))
        if cached is not None:
            report = TableReport(entry["name"], entry["sm3"], tuple(published), cached["rows"], cached["classes"],
                                 cached["min_class_size"], cached["classes_below_k"], cached["records_below_k"],
                                 tuple(dropped))
        else:
            report = replace(measure_table(build / entry["file"], entry["name"], entry["sm3"], entry["row_count"],
                                           published, k),
                             dropped_quasi_identifiers=tuple(dropped))
        reports.append(report)
    return KAnonymityReport(k, tuple(reports))


def enforce(institution_code: str, report: KAnonymityReport, override: KOverride | None) -> dict[str, Any] | None:
    """Check the report against k and return the override record to store, or None when none applies.

    Raises KAnonymityBelowError when a table is below k and ``override`` is None. The returned
    record (actor, reason, time, tables below k) goes into the manifest. An override that was not
    needed is not recorded.
    """
    below = report.below()
    if not below:
        return None
    if override is None:
        findings = "；".join(
            f"表 {table.table}（准标识符 {'、'.join(table.quasi_identifiers)}）最小等价类 {table.min_class_size} 条，"
            f"{table.records_below_k}/{table.rows} 条记录（{table.share_below_k:.1%}）所在的等价类少于 {report.k} 条"
            for table in below
        )
        raise KAnonymityBelowError(
            "EXTRACT_K_ANONYMITY_BELOW",
            f"机构 {institution_code} 的新数据提取未达到 k 匿名要求（k = {report.k}），未发布，原有提取保持不变：{findings}。"
            "准标识符的泛化只用于按规则保留原值的列；未经数据管理员确认分类的列按 4 级处理（多为令牌化），不做这种泛化，请先确认这些列的分类。"
            "仍不满足时，请在脱敏策略的 quasi_identifiers 中对这些列做更粗的泛化（bands 或 prefix）并重新审批策略；"
            "确需发布时，由安全管理员填写理由后强制发布（记入审计日志）。",
            k_anonymity={"k": report.k, "passed": False, "tables_below_k": [table.manifest_entry() for table in below]},
        )
    return {"actor": override.actor, "reason": override.reason,
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tables": [table.table for table in below]}
