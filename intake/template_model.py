"""Report templates: the declarative, versioned description of a regulatory table and its checks.

A template file (YAML, one per table code and version, in ``intake/templates/``) declares the
file layout, the fields with their types and value domains (代码表), the primary key and the
validation rules. :func:`load_catalog` parses every file and checks every cross-reference at
start. A broken template raises :class:`TemplateError` with a Chinese message that names the
file, the item and the fix, so it never reaches a submission.

Rule semantics, which the validator must follow:

- A rule with ``when`` applies only to the rows for which the condition holds.
- Only ``not_null`` flags empty values. A row rule whose fields are empty in a row skips that
  row, and an aggregate skips empty values.
- A field with ``multi: true`` contains several values separated by a half-width ``;``. Its
  ``length`` limits the whole text. ``code_list`` and ``reference`` rules and the pattern and
  check of a ``format`` rule apply to each value.
- ``error`` (错误) blocks acceptance of the file. ``warning`` (提示) needs an explanation in the
  remark field (备注) of the row or a reviewer's waiver.
- ``{period: start}`` and ``{period: end}`` are the first and the last day of the reporting
  period of the submission. The period field (采集日期) contains the period end.
- Lookups in other tables (``reference``, ``reconcile``) use the data of the same institution.

Every rule of kind ``not_null``, ``code_list`` and ``format`` that a field declaration implies
(``required``, ``code_list``, the type, length, ``format``) and the uniqueness of the primary
key within the file are added as rules with ids that start with ``AUTO-``, unless an explicit
rule without ``when`` already covers that field. :meth:`Template.effective_rules` returns both.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictStr,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from regsandbox_core.crypto import sm3_hex
from regsandbox_core.errors import RegsandboxError

if TYPE_CHECKING:
    from intake.reader import FileLayout

TEMPLATES_DIR = Path(__file__).with_name("templates")
SHARED_CODE_LISTS_FILE = "code_lists.yaml"
"""File in the templates folder that contains the code lists shared by all templates."""

MULTI_VALUE_SEPARATOR = ";"
AUTO_RULE_PREFIX = "AUTO-"
"""Prefix of the ids of derived rules. Explicit rule ids must not start with it."""

FIELD_TYPE_NAMES = {"text": "文本", "code": "代码", "integer": "整数", "decimal": "数值", "date": "日期"}
TEXT_TYPES = frozenset({"text", "code"})
NUMERIC_TYPES = frozenset({"integer", "decimal"})
NORMALISED_TYPES = frozenset({"code", "integer", "decimal", "date"})
"""Field types whose values the reader normalises (NFKC, surrounding blanks removed)."""

SEVERITY_NAMES = {"error": "错误", "warning": "提示"}
FREQUENCY_NAMES = {"monthly": "月报", "quarterly": "季报", "semiannual": "半年报", "annual": "年报", "ad_hoc": "不定期"}
RULE_KIND_NAMES = {
    "not_null": "非空",
    "unique": "唯一",
    "code_list": "值域",
    "format": "格式",
    "compare": "逻辑",
    "reference": "关联",
    "reconcile": "跨表核对",
    "fluctuation": "波动",
}

CHECKS = {
    "resident_id": "居民身份证号码：18 位，末位为 GB 11643 校验码",
    "uscc": "统一社会信用代码：18 位，末位为 GB 32100 校验码",
    "org_code": "组织机构代码：9 位（可写成 8 位-1 位），末位为 GB 11714 校验码",
    "bank_card": "银行卡号：13 至 19 位数字，末位为 Luhn 校验码",
    "mobile": "手机号码：11 位数字，以 1 开头，第 2 位为 3 至 9",
    "license_no": "金融许可证号：15 位，1 位大写字母、4 位数字、1 位大写字母、9 位数字，无校验码",
}
"""Check-digit and structure checks that a field's ``format.check`` may name, with a Chinese description."""

CHECK_MIN_LENGTHS = {"resident_id": 18, "uscc": 18, "org_code": 9, "bank_card": 19, "mobile": 11, "license_no": 15}
"""The smallest field ``length`` that fits a value accepted by each check."""

CheckName = Literal["resident_id", "uscc", "org_code", "bank_card", "mobile", "license_no"]
FieldType = Literal["text", "code", "integer", "decimal", "date"]
Severity = Literal["error", "warning"]
ComparisonOp = Literal["=", "!=", ">", ">=", "<", "<=", "in", "not_in"]
ConditionOp = Literal["=", "!=", ">", ">=", "<", "<=", "in", "not_in", "is_null", "not_null"]
DataSource = Literal["batch", "warehouse", "batch_or_warehouse"]

_ORDERING_OPS = frozenset({">", ">=", "<", "<="})
_SET_OPS = frozenset({"in", "not_in"})
_NULL_OPS = frozenset({"is_null", "not_null"})

_TEMPLATE_CODE_PATTERN = r"^[A-Z][A-Z0-9_]{1,63}$"
_FIELD_CODE_PATTERN = r"^[A-Z][A-Z0-9_]{0,31}$"
_RULE_ID_PATTERN = r"^[A-Z][A-Z0-9_]*(-[A-Z0-9_]+)+$"
_PATTERN_HINTS = {
    _TEMPLATE_CODE_PATTERN: "模板代码须以大写字母开头，只含大写字母、数字和下划线，2 至 64 个字符，例如 EAST_DGXDYWJJB",
    _FIELD_CODE_PATTERN: "字段代码须以大写字母开头，只含大写字母、数字和下划线，至多 32 个字符，例如 JJH",
    _RULE_ID_PATTERN: "规则编号须为大写字母和数字，用连字符分段，例如 R-JJ-001",
}

TemplateCode = Annotated[str, StringConstraints(pattern=_TEMPLATE_CODE_PATTERN)]
FieldCode = Annotated[str, StringConstraints(pattern=_FIELD_CODE_PATTERN)]
RuleId = Annotated[str, StringConstraints(pattern=_RULE_ID_PATTERN)]
NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class TemplateError(RegsandboxError):
    """A template file or the template catalog is invalid, or a requested template does not exist.

    ``problems`` lists each problem found in one file as ``(code, text)``. ``code`` is the code
    of the first problem, and ``message`` lists them all for the user.
    """

    status = 500

    def __init__(
        self, code: str, message: str, *, status: int | None = None, problems: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(code, message, status=status)
        self.problems = tuple(problems)


def _validate_scalar(value: Any) -> str | int | float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"应为字符串或数值，当前为 {_show(value)}")
    return value


Scalar = Annotated[str | int | float, PlainValidator(_validate_scalar)]
"""A constant in a rule: a string (codes, text, dates as 'YYYYMMDD') or a number."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- file layout, fields, code lists --------------------------------------------------------


class FileSpec(_Model):
    """Layout of a submitted data file."""

    delimiter: Literal["|", ","] = "|"
    header: bool = True
    trailing_delimiter: Literal["forbidden", "allowed", "required"] = "allowed"


class FieldFormat(_Model):
    """Format beyond the type and length: a regular expression the whole value must match, or a named check."""

    pattern: str | None = None
    check: CheckName | None = None


class TemplateField(_Model):
    """One column of the table."""

    code: FieldCode
    name: NonEmptyText
    type: FieldType
    length: int | None = Field(default=None, ge=1, le=4000)
    """Maximum number of characters of text and code fields (separators included), maximum digits of integers."""
    precision: int | None = Field(default=None, ge=1, le=38)
    scale: int | None = Field(default=None, ge=0, le=38)
    required: bool = False
    code_list: NonEmptyText | None = None
    format: FieldFormat | None = None
    multi: bool = False
    period: bool = False
    """Whether the field contains the period end (采集日期)."""
    remark: bool = False
    """Whether the field contains the justification for rule exceptions (备注)."""
    institution: bool = False
    """Whether the field contains the reporting institution's own identifier (金融许可证号)."""
    description: str | None = None


class CodeList(_Model):
    """Allowed codes of a field (代码表, 值域), each with its Chinese label, in display order."""

    description: str | None = None
    codes: dict[StrictStr, StrictStr] = Field(min_length=1)


class ReportLine(_Model):
    """One line (项目) of an aggregate report such as G01."""

    code: StrictStr = Field(min_length=1)
    name: NonEmptyText


# --- conditions and operands -------------------------------------------------------------------


class Operand(_Model):
    """Right-hand side of a comparison: one field, a constant, the period start or end, or a sum of fields."""

    field: FieldCode | None = None
    value: Scalar | None = None
    period: Literal["start", "end"] | None = None
    sum: tuple[FieldCode, ...] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _exactly_one(self) -> Operand:
        present = [name for name in ("field", "value", "period", "sum") if getattr(self, name) is not None]
        if len(present) != 1:
            raise ValueError("须且只能写 field、value、period、sum 中的一项，例如 {field: DKFFRQ} 或 {value: 0}")
        return self


def _check_comparison_shape(op: str, right: Operand | None, values: tuple | None) -> None:
    if op in _NULL_OPS:
        if right is not None or values is not None:
            raise ValueError(f"{op} 不需要 right 或 values，请删除它们")
    elif op in _SET_OPS:
        if values is None or len(values) == 0:
            raise ValueError(f"{op} 须用 values 列出取值，例如 values: ['01', '02']")
        if right is not None:
            raise ValueError(f"{op} 只能用 values，请删除 right")
    elif right is None or values is not None:
        raise ValueError(f"运算符 {op} 须用 right 给出比较对象（不能用 values），例如 right: {{field: DKFFRQ}}")


class Condition(_Model):
    """A test on one field of a row. A ``when`` clause combines tests with ``all`` and ``any``."""

    field: FieldCode
    op: ConditionOp
    right: Operand | None = None
    values: tuple[Scalar, ...] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Condition:
        _check_comparison_shape(self.op, self.right, self.values)
        return self


class AllOf(_Model):
    """Condition that is true when every clause is true."""

    all: tuple[When, ...] = Field(min_length=1)


class AnyOf(_Model):
    """Condition that is true when at least one clause is true."""

    any: tuple[When, ...] = Field(min_length=1)


def _when_tag(value: Any) -> str:
    if isinstance(value, dict):
        if "all" in value:
            return "all_of"
        if "any" in value:
            return "any_of"
        return "condition"
    if isinstance(value, AllOf):
        return "all_of"
    if isinstance(value, AnyOf):
        return "any_of"
    return "condition"


When = Annotated[
    Union[Annotated[Condition, Tag("condition")], Annotated[AllOf, Tag("all_of")], Annotated[AnyOf, Tag("any_of")]],
    Discriminator(_when_tag),
]
AllOf.model_rebuild()
AnyOf.model_rebuild()


class Aggregate(_Model):
    """A total over the rows of one table: ``sum`` of a numeric field or ``count`` of rows, optionally filtered."""

    function: Literal["sum", "count"] = "sum"
    field: FieldCode | None = None
    when: When | None = None

    @model_validator(mode="after")
    def _field_for_sum(self) -> Aggregate:
        if self.function == "sum" and self.field is None:
            raise ValueError("function 为 sum 时须用 field 写明求和的字段")
        if self.function == "count" and self.field is not None:
            raise ValueError("function 为 count 时统计行数，请删除 field")
        return self


class Tolerance(_Model):
    """Allowed difference: ``absolute`` in the unit of the left side, ``relative`` as a share of the right side."""

    absolute: Decimal | None = Field(default=None, ge=0)
    relative: Decimal | None = Field(default=None, ge=0)
    combine: Literal["any", "all"] = "any"
    """Combination of two tolerances: ``any`` passes within either of them, ``all`` only within both."""

    @model_validator(mode="after")
    def _at_least_one(self) -> Tolerance:
        if self.absolute is None and self.relative is None:
            raise ValueError("须至少写 absolute（绝对差额）或 relative（相对差异，如 0.001 表示 0.1%）中的一项")
        return self


# --- rules ----------------------------------------------------------------------------------------


class _RuleBase(_Model):
    id: RuleId
    name: NonEmptyText
    severity: Severity
    description: str | None = None

    @field_validator("severity", mode="before")
    @classmethod
    def _chinese_severity(cls, value: Any) -> Any:
        return {"错误": "error", "提示": "warning"}.get(value, value) if isinstance(value, str) else value


class NotNullRule(_RuleBase):
    """非空: each field is not empty (in the rows where ``when`` holds)."""

    kind: Literal["not_null"]
    fields: tuple[FieldCode, ...] = Field(min_length=1)
    when: When | None = None


class UniqueRule(_RuleBase):
    """唯一: the combination of ``fields`` occurs once in the file.

    With ``scope: history`` it must also not occur in the accepted data of earlier periods of the
    same institution and template code.
    """

    kind: Literal["unique"]
    fields: tuple[FieldCode, ...] = Field(min_length=1)
    scope: Literal["file", "history"] = "file"
    when: When | None = None


class CodeListRule(_RuleBase):
    """值域: each value is one of the field's allowed codes, or a code of ``code_list`` when the rule names one.

    The allowed codes of a field are its code list, or the report lines for the line field of an
    aggregate template (:meth:`Template.allowed_codes`).
    """

    kind: Literal["code_list"]
    fields: tuple[FieldCode, ...] = Field(min_length=1)
    code_list: NonEmptyText | None = None
    when: When | None = None


class FormatRule(_RuleBase):
    """格式: each value fits the field's type, length, precision, date (YYYYMMDD) and declared format.

    ``pattern`` and ``check`` on the rule add a further regular expression or check.
    """

    kind: Literal["format"]
    fields: tuple[FieldCode, ...] = Field(min_length=1)
    pattern: str | None = None
    check: CheckName | None = None
    when: When | None = None


class CompareRule(_RuleBase):
    """逻辑: ``left op right`` holds, or ``left`` is (not) among ``values`` for ``in``/``not_in``.

    ``tolerance`` (numeric only) widens the comparison by that absolute amount, for example
    ``=`` passes when ``|left - right| <= tolerance``.
    """

    kind: Literal["compare"]
    left: FieldCode
    op: ComparisonOp
    right: Operand | None = None
    values: tuple[Scalar, ...] | None = None
    tolerance: Decimal | None = Field(default=None, ge=0)
    when: When | None = None

    @model_validator(mode="after")
    def _shape(self) -> CompareRule:
        _check_comparison_shape(self.op, self.right, self.values)
        return self


class ReferenceTarget(_Model):
    """Fields of another template that the referring fields must match, in the same order."""

    template: TemplateCode
    version: int | None = Field(default=None, ge=1)
    fields: tuple[FieldCode, ...] = Field(min_length=1)


class ReferenceRule(_RuleBase):
    """关联: the values of ``fields`` exist as ``target.fields`` in a row of the target table.

    ``source`` names where to look: the same submission batch, the warehouse of accepted data,
    or both. ``period: same`` looks only at data of the same period.
    """

    kind: Literal["reference"]
    fields: tuple[FieldCode, ...] = Field(min_length=1)
    target: ReferenceTarget
    source: DataSource = "batch_or_warehouse"
    period: Literal["same", "any"] = "same"
    when: When | None = None


class ReconcileTarget(_Model):
    """Right side of a reconciliation: a line and column of an aggregate report, or an aggregate of a table.

    The value is multiplied by ``factor`` before the comparison, for example 10000 when the
    report is in 万元 and the left side in 元.
    """

    template: TemplateCode
    version: int | None = Field(default=None, ge=1)
    line: StrictStr | None = None
    column: FieldCode | None = None
    aggregate: Aggregate | None = None
    factor: Decimal = Field(default=Decimal(1), gt=0)

    @model_validator(mode="after")
    def _line_or_aggregate(self) -> ReconcileTarget:
        line_form = self.line is not None or self.column is not None
        if line_form == (self.aggregate is not None):
            raise ValueError("须写 line 和 column（报表的项目和列），或写 aggregate（明细表的汇总），二者选一")
        if line_form and (self.line is None or self.column is None):
            raise ValueError("按报表项目核对时须同时写 line（项目代码）和 column（金额列的字段代码）")
        return self


class ReconcileRule(_RuleBase):
    """跨表核对: an aggregate of this table compared with another report's line or table's aggregate.

    Both sides use the same institution and period. The difference ``left - right × factor``
    must satisfy ``op`` within ``tolerance``.
    """

    kind: Literal["reconcile"]
    left: Aggregate
    op: Literal["=", "<=", ">="] = "="
    right: ReconcileTarget
    tolerance: Tolerance | None = None
    source: DataSource = "batch_or_warehouse"


class FluctuationRule(_RuleBase):
    """波动: the relative change of an aggregate against the baseline period stays within ``threshold``.

    change = (current - baseline) / |baseline|, flagged when ``|change| > threshold`` (``direction:
    both``), ``change > threshold`` (``increase``) or ``-change > threshold`` (``decrease``).
    The rule is skipped when no accepted baseline exists, or when ``|baseline|`` is 0 or below
    ``min_baseline``.
    """

    kind: Literal["fluctuation"]
    measure: Aggregate
    baseline: Literal["previous_period", "same_period_last_year"] = "previous_period"
    threshold: Decimal = Field(gt=0)
    direction: Literal["both", "increase", "decrease"] = "both"
    min_baseline: Decimal | None = Field(default=None, ge=0)


Rule = Annotated[
    Union[
        NotNullRule, UniqueRule, CodeListRule, FormatRule, CompareRule, ReferenceRule, ReconcileRule, FluctuationRule
    ],
    Discriminator("kind"),
]


# --- the template --------------------------------------------------------------------------------


class Template(_Model):
    """One version of one table or report, as declared in its YAML file.

    The loader fills in the source path, the SM3 digest, the resolved code lists and the derived
    rules. Build templates with :func:`load_catalog` or :func:`load_template_file`, not directly.
    """

    code: TemplateCode
    name: NonEmptyText
    version: int = Field(ge=1)
    standard: NonEmptyText
    kind: Literal["detail", "aggregate"]
    frequency: Literal["monthly", "quarterly", "semiannual", "annual", "ad_hoc"]
    description: str | None = None
    file: FileSpec = FileSpec()
    fields: tuple[TemplateField, ...] = Field(min_length=1)
    primary_key: tuple[FieldCode, ...] = ()
    code_lists: dict[NonEmptyText, CodeList] = {}
    line_field: FieldCode | None = None
    lines: tuple[ReportLine, ...] = ()
    rules: tuple[Rule, ...] = ()

    _source_path: Path | None = PrivateAttr(default=None)
    _digest: str = PrivateAttr(default="")
    _resolved_code_lists: dict[str, CodeList] = PrivateAttr(default_factory=dict)
    _effective_rules: tuple[Any, ...] = PrivateAttr(default=())

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def digest(self) -> str:
        """SM3 of the canonical content of the file and of the shared code lists it uses (64 hex characters)."""
        return self._digest

    @property
    def label(self) -> str:
        return f"{self.code}（{self.name}）第 {self.version} 版"

    def field(self, code: str) -> TemplateField:
        """Return the field with this code, or raise ``KeyError`` when the template has none."""
        for item in self.fields:
            if item.code == code:
                return item
        raise KeyError(code)

    def has_field(self, code: str) -> bool:
        return any(item.code == code for item in self.fields)

    @property
    def period_field(self) -> TemplateField | None:
        return next((item for item in self.fields if item.period), None)

    @property
    def remark_field(self) -> TemplateField | None:
        return next((item for item in self.fields if item.remark), None)

    @property
    def institution_field(self) -> TemplateField | None:
        return next((item for item in self.fields if item.institution), None)

    def code_list(self, name: str) -> CodeList:
        """Return a code list that this template uses, local or shared, or raise ``KeyError``."""
        return self._resolved_code_lists[name]

    def allowed_codes(self, field_code: str) -> Mapping[str, str] | None:
        """Return code → label allowed in a field: its code list, the report lines for the line field, or None."""
        if self.kind == "aggregate" and field_code == self.line_field:
            return {line.code: line.name for line in self.lines}
        name = self.field(field_code).code_list
        return self._resolved_code_lists[name].codes if name else None

    def effective_rules(self) -> tuple[Rule, ...]:
        """Return the declared rules followed by the derived ``AUTO-`` rules, in a stable order."""
        return self._effective_rules

    def file_layout(self) -> FileLayout:
        """Build the reader's :class:`~intake.reader.FileLayout` for files of this template."""
        # The reader owns FileLayout. Importing it here, not at module level, keeps
        # `import intake.template_model` free of the reader's Parquet dependencies.
        from intake.reader import FileLayout

        return FileLayout(
            columns=tuple(item.code for item in self.fields),
            column_names=tuple(item.name for item in self.fields),
            normalised=frozenset(item.code for item in self.fields if item.type in NORMALISED_TYPES),
            delimiter=self.file.delimiter,
            header=self.file.header,
            trailing_delimiter=self.file.trailing_delimiter,
        )


class SharedCodeLists(_Model):
    """Contents of ``code_lists.yaml``."""

    description: str | None = None
    code_lists: dict[NonEmptyText, CodeList] = Field(min_length=1)


# --- the catalog -----------------------------------------------------------------------------------


class TemplateCatalog:
    """All loaded templates, looked up by table code and version."""

    def __init__(self, templates: Iterable[Template]) -> None:
        self._by_code: dict[str, dict[int, Template]] = {}
        for template in templates:
            self._by_code.setdefault(template.code, {})[template.version] = template

    @classmethod
    def load(cls, directory: Path | str | None = None) -> TemplateCatalog:
        """Load the templates of ``directory``, or return the current catalog when ``directory`` is None.

        The current catalog contains the shipped templates and the versions a system administrator
        added in the data directory (see :mod:`intake.template_store`). It is cached until
        :func:`intake.template_store.reload_catalog` is called.
        """
        if directory is None:
            from intake.template_store import current_catalog  # that module imports this one

            return current_catalog()
        return load_catalog(directory)

    def get(self, code: str, version: int | None = None) -> Template:
        """Return one version of a template, the newest when ``version`` is None.

        Raises ``TemplateError`` with code ``TEMPLATE_NOT_FOUND`` (HTTP 404) for an unknown code or version.
        """
        versions = self._by_code.get(code)
        if not versions:
            known = "、".join(
                f"{item.code}（{item.name}）" for item in (self.get(name) for name in sorted(self._by_code))
            )
            raise TemplateError(
                "TEMPLATE_NOT_FOUND",
                f"报表模板 {code} 不存在。已加载的模板有：{known or '无'}。请检查模板代码，"
                f"或把该模板的 YAML 文件放入模板目录后重新加载。",
                status=404,
            )
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            known_versions = "、".join(str(number) for number in sorted(versions))
            raise TemplateError(
                "TEMPLATE_NOT_FOUND",
                f"报表模板 {code} 没有第 {version} 版，已有版本：{known_versions}。请改用已有版本。",
                status=404,
            )
        return versions[version]

    def codes(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_code))

    def versions(self, code: str) -> tuple[int, ...]:
        return tuple(sorted(self._by_code.get(code, {})))

    def all(self) -> tuple[Template, ...]:
        """Return every loaded template, every version, sorted by code and version."""
        return tuple(
            self._by_code[code][version] for code in sorted(self._by_code) for version in sorted(self._by_code[code])
        )

    def __contains__(self, code: object) -> bool:
        return code in self._by_code

    def __len__(self) -> int:
        return sum(len(versions) for versions in self._by_code.values())


def re2_problem(pattern: str) -> str | None:
    """Return why DuckDB's regular-expression engine (RE2) rejects ``pattern``, or None when it compiles.

    Validation runs the patterns in DuckDB, whose RE2 lacks lookaround and backreferences that
    Python's ``re`` accepts, so a template is checked against both when it loads.
    """
    import duckdb  # noqa: PLC0415 - only templates with patterns need it

    with duckdb.connect() as connection:
        try:
            connection.execute("SELECT regexp_full_match('', ?)", [pattern]).fetchall()
        except duckdb.Error as exc:
            text = str(exc)
            return text.split(":", 1)[-1].strip()[:120] or "无法编译"
    return None


# --- loading ---------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping with a repeated key, which PyYAML would silently overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"键 {key} 重复出现，后一个会覆盖前一个。请删除或合并重复的键", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_catalog(directory: Path | str = TEMPLATES_DIR) -> TemplateCatalog:
    """Load and check every template file in ``directory``.

    Reads ``code_lists.yaml`` (shared code lists, optional) and every other ``*.yaml`` file as one
    template. Raises ``TemplateError`` for the first invalid file, a repeated code and version,
    or a reference to a template or field that does not exist.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise TemplateError("TEMPLATE_INVALID", f"报表模板目录 {folder} 不存在。请检查安装，或指定存放模板 YAML 文件的目录。")

    misnamed = sorted(folder.glob("*.yml"))
    if misnamed:
        raise TemplateError(
            "TEMPLATE_INVALID",
            f"报表模板文件 {misnamed[0]} 的扩展名为 .yml，不会被加载。请改为 .yaml。",
        )

    shared_path = folder / SHARED_CODE_LISTS_FILE
    shared = load_shared_code_lists(shared_path) if shared_path.exists() else {}

    templates: list[Template] = []
    seen: dict[tuple[str, int], Template] = {}
    for path in sorted(folder.glob("*.yaml")):
        # Hidden files are editor backups and lock files, not templates.
        if path.name == SHARED_CODE_LISTS_FILE or path.name.startswith("."):
            continue
        template = load_template_file(path, shared)
        key = (template.code, template.version)
        if key in seen:
            first = seen[key].source_path
            raise TemplateError(
                "TEMPLATE_DUPLICATE",
                f"报表模板文件 {path} 无效：模板 {template.code} 第 {template.version} 版已在 {first} 中定义。"
                f"同一模板的新版本请把 version 加 1，或删除重复的文件。",
            )
        seen[key] = template
        templates.append(template)

    catalog = TemplateCatalog(templates)
    for template in templates:
        check_cross_references(template, catalog)
    return catalog


def load_shared_code_lists(path: Path | str) -> dict[str, CodeList]:
    """Load the shared code lists file; raise ``TemplateError`` when it is invalid."""
    file_path = Path(path)
    raw = _read_yaml(file_path)
    problems = _Problems(file_path)
    try:
        parsed = SharedCodeLists.model_validate(raw)
    except ValidationError as exc:
        for text in _describe_validation_error(exc, raw):
            problems.add("TEMPLATE_INVALID", text)
        raise problems.error() from exc
    for name, code_list in parsed.code_lists.items():
        _check_code_list_entries(name, code_list, problems)
    problems.raise_if_any()
    return dict(parsed.code_lists)


def load_template_file(
    path: Path | str, shared_code_lists: Mapping[str, CodeList] | None = None, *, content: bytes | None = None
) -> Template:
    """Load and check one template file against the shared code lists.

    With ``content``, the file is not read: ``content`` is parsed and ``path`` only names the file
    in messages, as for an uploaded file that is not stored yet. References to other templates are
    checked only by :func:`load_catalog` and :func:`check_cross_references`.
    """
    file_path = Path(path)
    shared = dict(shared_code_lists or {})
    raw = _read_yaml(file_path) if content is None else _parse_yaml(content, file_path)
    problems = _Problems(file_path)
    try:
        template = Template.model_validate(raw)
    except ValidationError as exc:
        for text in _describe_validation_error(exc, raw):
            problems.add("TEMPLATE_INVALID", text)
        raise problems.error() from exc

    checker = _TemplateChecker(template, shared, problems)
    resolved = checker.run()
    problems.raise_if_any()

    template._source_path = file_path
    template._resolved_code_lists = resolved
    template._effective_rules = template.rules + _derive_rules(template)
    template._digest = _digest(file_path, raw, resolved, template, shared)
    return template


def _read_yaml(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TemplateError("TEMPLATE_INVALID", f"无法读取报表模板文件 {path}：{exc.strerror}。请检查文件是否存在及其权限。") from exc
    return _parse_yaml(data, path)


def _parse_yaml(data: bytes, path: Path) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError(
            "TEMPLATE_YAML_INVALID",
            f"报表模板文件 {path} 不是 UTF-8 编码（第 {exc.start + 1} 个字节无法解码）。请以 UTF-8 编码另存该文件。",
        ) from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: builds no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        place = f"第 {mark.line + 1} 行第 {mark.column + 1} 列" if mark else "某处"
        raise TemplateError(
            "TEMPLATE_YAML_INVALID",
            f"报表模板文件 {path} 的 YAML 语法有误，位置：{place}（解析器提示：{exc.problem or exc}）。"
            f"请检查该处的缩进、冒号和引号。",
        ) from exc
    except yaml.YAMLError as exc:
        raise TemplateError(
            "TEMPLATE_YAML_INVALID", f"报表模板文件 {path} 的 YAML 语法有误（{exc}）。请检查缩进、冒号和引号。"
        ) from exc
    if not isinstance(raw, dict):
        raise TemplateError(
            "TEMPLATE_INVALID",
            f"报表模板文件 {path} 的顶层应为键值对（以 code:、name: 等开头），当前为 {_show(raw)}。",
        )
    return raw


def _digest(
    path: Path,
    raw: dict[str, Any],
    resolved: Mapping[str, CodeList],
    template: Template,
    shared: Mapping[str, CodeList],
) -> str:
    """SM3 over the parsed file content and the shared code lists it uses, as canonical JSON.

    Comments, key order, quoting and indentation do not change the digest, but any change of a
    value does. Changes to the loader's own defaults are not covered.
    """
    used_shared = {
        name: code_list.model_dump(mode="json")
        for name, code_list in sorted(resolved.items())
        if name not in template.code_lists and name in shared
    }
    content = {"template": raw, "shared_code_lists": used_shared}
    try:
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TemplateError(
            "TEMPLATE_INVALID", f"报表模板文件 {path} 含有无法规范化的取值（{exc}）。请只使用字符串、数值、true/false、列表和键值对。"
        ) from exc
    return sm3_hex(canonical.encode("utf-8"))


# --- problems and pydantic messages in Chinese --------------------------------------------------------

_MAX_PROBLEMS_SHOWN = 20


class _Problems:
    """Problems found in one file, raised together as one ``TemplateError``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[tuple[str, str]] = []

    def add(self, code: str, text: str) -> None:
        self.items.append((code, text))

    def raise_if_any(self) -> None:
        if self.items:
            raise self.error()

    def error(self) -> TemplateError:
        if len(self.items) == 1:
            message = f"报表模板文件 {self.path} 无效：{self.items[0][1]}。"
        else:
            listed = "；".join(
                f"（{number}）{text}" for number, (_, text) in enumerate(self.items[:_MAX_PROBLEMS_SHOWN], 1)
            )
            more = len(self.items) - _MAX_PROBLEMS_SHOWN
            suffix = f"；另有 {more} 处问题未列出" if more > 0 else ""
            message = f"报表模板文件 {self.path} 有 {len(self.items)} 处问题：{listed}{suffix}。"
        return TemplateError(self.items[0][0], message, problems=self.items)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choices(expected: str) -> str:
    return expected.replace(" or ", "、").replace(", ", "、")


def _describe_validation_error(exc: ValidationError, raw: Any) -> list[str]:
    texts = []
    for error in exc.errors(include_url=False):
        where = _render_location(error["loc"], raw)
        text = _translate_error(error)
        texts.append(f"{where}：{text}" if where else text)
    return texts


def _render_location(location: tuple[Any, ...], raw: Any) -> str:
    """Render a pydantic error location as 'rules 第 6 项（R-JJ-006） → severity', skipping union tags."""
    segments: list[str] = []
    node = raw
    for position, key in enumerate(location):
        last = position == len(location) - 1
        if key == "[key]":
            segments.append("（键名）")
            continue
        if isinstance(node, dict):
            if key in node:
                segments.append(str(key))
                node = node[key]
            elif last or not isinstance(key, str):
                segments.append(str(key))
                node = None
            # Otherwise ``key`` is a union tag such as the rule kind, which has no place in the file.
            continue
        if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            item = node[key]
            label = f"第 {key + 1} 项"
            if isinstance(item, dict):
                ident = item.get("id", item.get("code"))
                if isinstance(ident, (str, int)):
                    label += f"（{ident}）"
            if segments:
                segments[-1] = f"{segments[-1]} {label}"
            else:
                segments.append(label)
            node = item
            continue
        segments.append(str(key))
        node = None
    return " → ".join(segments)


_EXPECTED_TYPES = {
    "int_type": "整数",
    "int_parsing": "整数",
    "int_from_float": "整数",
    "bool_type": "true 或 false",
    "bool_parsing": "true 或 false",
    "tuple_type": "列表（每项以“- ”开头，或写成 [a, b]）",
    "list_type": "列表（每项以“- ”开头，或写成 [a, b]）",
    "dict_type": "键值对",
    "model_type": "键值对",
    "model_attributes_type": "键值对",
    "decimal_parsing": "有限的数值",
    "decimal_type": "有限的数值",
    "float_parsing": "有限的数值",
    "float_type": "有限的数值",
    "finite_number": "有限的数值",
}
"""Chinese name of the expected value for pydantic's type errors."""

_BOUNDS = {"greater_than": ("gt", "应大于"), "greater_than_equal": ("ge", "应不小于"), "less_than_equal": ("le", "应不大于")}


def _translate_error(error: Mapping[str, Any]) -> str:
    """Return a Chinese message for one pydantic error, without its location."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")

    if kind in _EXPECTED_TYPES:
        return f"应为{_EXPECTED_TYPES[kind]}，当前为 {_show(value)}"
    if kind in _BOUNDS:
        key, text = _BOUNDS[kind]
        return f"{text} {ctx.get(key)}，当前为 {_show(value)}"
    if kind == "string_type":
        return (
            f"应为字符串，当前为 {_show(value)}。YAML 会把不加引号的 01、7.1、20240131 等读成数字或日期，"
            f"请给这个值加上引号"
        )

    if kind == "missing":
        return "缺少必填项，请补上"
    if kind == "extra_forbidden":
        return "不是模板支持的键，请检查拼写或删除这一项"
    if kind in {"string_too_short", "too_short"}:
        return "不能为空"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return f"取值 {_show(value)} 格式不对：{_PATTERN_HINTS.get(pattern, '须符合正则表达式 ' + pattern)}"

    if kind == "literal_error":
        hint = "（也可写成 错误 或 提示）" if error["loc"] and error["loc"][-1] == "severity" else ""
        return f"取值 {_show(value)} 无效，可选值：{_choices(str(ctx.get('expected', '')))}{hint}"
    if kind == "union_tag_invalid":
        return f"kind 取值 {_show(ctx.get('tag'))} 无效，可选值：{_choices(str(ctx.get('expected_tags', '')))}"
    if kind == "union_tag_not_found":
        return f"缺少 kind，请写明规则类型，可选值：{'、'.join(RULE_KIND_NAMES)}"

    # Messages of this module's own validators, already in Chinese.
    if kind == "value_error":
        return str(ctx.get("error", error.get("msg", "")))
    return f"取值 {_show(value)} 无效（{error.get('msg', '')}）"


# --- checks of one template ---------------------------------------------------------------------------


def _value_class(field_type: str) -> str:
    if field_type in NUMERIC_TYPES:
        return "number"
    if field_type == "date":
        return "date"
    return "text"


_CLASS_NAMES = {"number": "数值", "date": "日期", "text": "文本"}


def _is_normalised(code: str) -> bool:
    return unicodedata.normalize("NFKC", code).strip() == code


def _valid_date_text(value: str) -> bool:
    if not re.fullmatch(r"\d{8}", value):
        return False
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def _rule_label(rule: Any) -> str:
    return f"规则 {rule.id}（{rule.name}）"


def _check_code_list_entries(name: str, code_list: CodeList, problems: _Problems) -> None:
    for code, label in code_list.codes.items():
        if not code or not _is_normalised(code):
            problems.add(
                "TEMPLATE_INVALID",
                f"代码表“{name}”的代码 {_show(code)} 为空或含全角字符、首尾空格。上报值会先做 NFKC 规范化并去掉首尾空格，"
                f"请把代码写成规范化后的形式（{_show(unicodedata.normalize('NFKC', code).strip())}）",
            )
        if not label.strip():
            problems.add("TEMPLATE_INVALID", f"代码表“{name}”的代码 {code} 缺少中文名称，请补上")


class _FieldScope:
    """The fields and code lists of one template, for checks that name its fields."""

    def __init__(self, template: Template, code_lists: Mapping[str, CodeList]) -> None:
        self.template = template
        self.fields = {item.code: item for item in template.fields}
        self.code_lists = code_lists

    def allowed_codes(self, item: TemplateField) -> Mapping[str, str] | None:
        if self.template.kind == "aggregate" and item.code == self.template.line_field:
            return {line.code: line.name for line in self.template.lines}
        if item.code_list and item.code_list in self.code_lists:
            return self.code_lists[item.code_list].codes
        return None


class _TemplateChecker:
    """Checks of one template that need more than its own schema: names, roles, types and code lists."""

    def __init__(self, template: Template, shared: Mapping[str, CodeList], problems: _Problems) -> None:
        self.template = template
        self.shared = shared
        self.problems = problems
        self.resolved: dict[str, CodeList] = {}
        self.scope = _FieldScope(template, self.resolved)

    def add(self, code: str, text: str) -> None:
        self.problems.add(code, text)

    def run(self) -> dict[str, CodeList]:
        self._check_local_code_lists()
        self._check_fields()
        self._check_roles()
        self._check_primary_key()
        self._check_lines()
        self._check_rules()
        return self.resolved

    # code lists

    def _check_local_code_lists(self) -> None:
        for name, code_list in self.template.code_lists.items():
            if name in self.shared:
                self.add(
                    "TEMPLATE_CODE_LIST_DUPLICATE",
                    f"本文件的代码表“{name}”与 {SHARED_CODE_LISTS_FILE} 中的共享代码表同名。请改名，或删除本地定义直接引用共享代码表",
                )
            _check_code_list_entries(name, code_list, self.problems)
            self.resolved[name] = code_list

    def _resolve_code_list(self, name: str, where: str) -> CodeList | None:
        if name in self.resolved:
            return self.resolved[name]
        if name in self.shared:
            self.resolved[name] = self.shared[name]
            return self.shared[name]
        known = "、".join(sorted({*self.template.code_lists, *self.shared})) or "无"
        self.add(
            "TEMPLATE_CODE_LIST_UNKNOWN",
            f"{where}引用的代码表“{name}”不存在。请在本文件的 code_lists 或 {SHARED_CODE_LISTS_FILE} 中定义它，"
            f"或改为已有的代码表：{known}",
        )
        return None

    # fields

    def _check_fields(self) -> None:
        codes: set[str] = set()
        names: set[str] = set()
        for item in self.template.fields:
            where = f"字段 {item.code}（{item.name}）"
            if item.code in codes:
                self.add("TEMPLATE_FIELD_DUPLICATE", f"字段代码 {item.code} 重复出现，请为每个字段使用不同的代码")
            if item.name in names:
                self.add(
                    "TEMPLATE_FIELD_DUPLICATE",
                    f"字段名称“{item.name}”重复出现。带表头的文件可以用中文名称对应字段，请为每个字段使用不同的名称",
                )
            codes.add(item.code)
            names.add(item.name)
            self._check_field_type(item, where)
            self._check_field_format(item, where)
            if item.code_list is not None:
                if item.type != "code":
                    self.add("TEMPLATE_TYPE_MISMATCH", f"{where}的类型为 {item.type}，只有 code 类型的字段能引用代码表，请把 type 改为 code")
                self._resolve_code_list(item.code_list, where)
            if item.multi and item.type not in TEXT_TYPES:
                self.add("TEMPLATE_TYPE_MISMATCH", f"{where}的类型为 {item.type}，只有 text 或 code 字段能用 multi 填写多个值")

    def _check_field_type(self, item: TemplateField, where: str) -> None:
        if item.type in TEXT_TYPES and item.length is None:
            self.add("TEMPLATE_INVALID", f"{where}是 {item.type} 类型，须用 length 写明最大字符数")
        if item.type == "decimal":
            if item.precision is None or item.scale is None:
                self.add(
                    "TEMPLATE_INVALID",
                    f"{where}是 decimal 类型，须写 precision 和 scale，金额一般为 precision: 20、scale: 2，利率为 scale: 6",
                )
            elif item.scale > item.precision:
                self.add("TEMPLATE_INVALID", f"{where}的 scale（{item.scale}）大于 precision（{item.precision}），请改小 scale")
            if item.length is not None:
                self.add("TEMPLATE_INVALID", f"{where}是 decimal 类型，长度由 precision 和 scale 决定，请删除 length")
        elif item.precision is not None or item.scale is not None:
            self.add("TEMPLATE_INVALID", f"{where}是 {item.type} 类型，precision 和 scale 只适用于 decimal，请删除")
        if item.type == "date" and item.length is not None:
            self.add("TEMPLATE_INVALID", f"{where}是 date 类型，固定为 8 位 YYYYMMDD，请删除 length")

    def _check_field_format(self, item: TemplateField, where: str) -> None:
        if item.format is None:
            return
        if item.format.pattern is not None:
            if item.type not in {"text", "code", "integer"}:
                self.add("TEMPLATE_TYPE_MISMATCH", f"{where}是 {item.type} 类型，format.pattern 只适用于 text、code、integer 字段")
            self._check_pattern(item.format.pattern, f"{where}的 format.pattern")
        if item.format.check is not None:
            self._check_check(item, item.format.check, where)

    def _check_pattern(self, pattern: str, where: str) -> None:
        try:
            re.compile(pattern)
        except re.error as exc:
            self.add(
                "TEMPLATE_REGEX_INVALID",
                f"{where} {_show(pattern)} 不是有效的正则表达式（第 {(exc.pos or 0) + 1} 个字符：{exc.msg}）。"
                f"请修正该表达式，YAML 中建议用单引号包住它",
            )
            return
        problem = re2_problem(pattern)
        if problem is not None:
            self.add(
                "TEMPLATE_REGEX_INVALID",
                f"{where} {_show(pattern)} 校验引擎（RE2）不支持：{problem}。"
                f"请改写该表达式，不要使用前后查找（?= ?! ?<= ?<!）和反向引用（\\1）",
            )

    def _check_check(self, item: TemplateField, check: str, where: str) -> None:
        if item.type not in TEXT_TYPES:
            self.add("TEMPLATE_TYPE_MISMATCH", f"{where}是 {item.type} 类型，校验 {check} 只适用于 text 或 code 字段")
            return
        minimum = CHECK_MIN_LENGTHS[check]
        if item.length is not None and item.length < minimum:
            self.add(
                "TEMPLATE_INVALID",
                f"{where}的 length 为 {item.length}，放不下校验 {check}（{CHECKS[check]}）要求的 {minimum} 位，"
                f"请把 length 改为至少 {minimum}",
            )

    # roles

    def _check_roles(self) -> None:
        template = self.template
        periods = [item for item in template.fields if item.period]
        institutions = [item for item in template.fields if item.institution]
        remarks = [item for item in template.fields if item.remark]
        if template.kind == "detail" and len(periods) != 1:
            found = "、".join(item.code for item in periods) or "没有"
            self.add(
                "TEMPLATE_PERIOD_FIELD",
                f"明细模板须有且只有一个 period: true 的字段（采集日期，填期末日期），当前{('为 ' + found) if periods else '没有'}。"
                f"请在采集日期字段上写 period: true",
            )
        elif len(periods) > 1:
            self.add("TEMPLATE_PERIOD_FIELD", f"至多一个字段可写 period: true，当前为 {'、'.join(item.code for item in periods)}")
        if template.kind == "detail" and len(institutions) != 1:
            self.add(
                "TEMPLATE_INVALID",
                f"明细模板须有且只有一个 institution: true 的字段（金融许可证号），当前有 {len(institutions)} 个。"
                f"请在金融许可证号字段上写 institution: true",
            )
        elif len(institutions) > 1:
            codes = "、".join(item.code for item in institutions)
            self.add("TEMPLATE_INVALID", f"至多一个字段可写 institution: true，当前为 {codes}")
        if len(remarks) > 1:
            self.add("TEMPLATE_INVALID", f"至多一个字段可写 remark: true，当前为 {'、'.join(item.code for item in remarks)}")
        for item in periods:
            if item.type != "date" or not item.required or item.multi:
                self.add("TEMPLATE_TYPE_MISMATCH", f"采集日期字段 {item.code} 须为 date 类型、required: true，且不能写 multi")
        for item in institutions:
            if item.type not in TEXT_TYPES or not item.required or item.multi:
                self.add("TEMPLATE_TYPE_MISMATCH", f"机构标识字段 {item.code} 须为 text 或 code 类型、required: true，且不能写 multi")
        for item in remarks:
            if item.type != "text" or item.required or item.multi:
                self.add("TEMPLATE_TYPE_MISMATCH", f"备注字段 {item.code} 须为 text 类型，不能写 required: true 或 multi")

    def _check_primary_key(self) -> None:
        template = self.template
        if template.kind == "detail" and not template.primary_key:
            self.add("TEMPLATE_INVALID", "明细模板须用 primary_key 列出唯一标识一行的字段，例如 [JRXKZH, JJH]")
        if len(set(template.primary_key)) != len(template.primary_key):
            self.add("TEMPLATE_INVALID", f"primary_key {list(template.primary_key)} 中有重复的字段，请删除重复项")
        for code in template.primary_key:
            item = self._field(code, "primary_key ")
            if item is None:
                continue
            if not item.required:
                self.add("TEMPLATE_INVALID", f"主键字段 {code}（{item.name}）须为 required: true，主键不能为空")
            if item.multi:
                self.add("TEMPLATE_INVALID", f"主键字段 {code}（{item.name}）不能写 multi")

    def _check_lines(self) -> None:
        template = self.template
        if template.kind == "detail":
            if template.line_field is not None or template.lines:
                self.add("TEMPLATE_INVALID", "line_field 和 lines 只用于汇总报表（kind: aggregate），明细模板请删除它们")
            return
        if template.line_field is None or not template.lines:
            self.add("TEMPLATE_INVALID", "汇总报表（kind: aggregate）须写 line_field（项目代码字段）和 lines（项目列表）")
            return
        item = self._field(template.line_field, "line_field ")
        if item is not None:
            if item.type not in TEXT_TYPES or not item.required or item.multi:
                self.add("TEMPLATE_TYPE_MISMATCH", f"项目代码字段 {item.code} 须为 text 或 code 类型、required: true，且不能写 multi")
            if item.code_list is not None:
                self.add("TEMPLATE_INVALID", f"项目代码字段 {item.code} 的取值由 lines 决定，请删除它的 code_list")
        seen: set[str] = set()
        for line in template.lines:
            if line.code in seen:
                self.add("TEMPLATE_INVALID", f"lines 中项目代码 {line.code} 重复出现，请为每个项目使用不同的代码")
            if not _is_normalised(line.code):
                self.add("TEMPLATE_INVALID", f"lines 中项目代码 {_show(line.code)} 含全角字符或首尾空格，请写成规范化后的形式")
            seen.add(line.code)

    # rules

    def _check_rules(self) -> None:
        seen: set[str] = set()
        for rule in self.template.rules:
            if rule.id in seen:
                self.add("TEMPLATE_RULE_DUPLICATE", f"规则编号 {rule.id} 重复出现，请为每条规则使用不同的编号")
            seen.add(rule.id)
            if rule.id.startswith(AUTO_RULE_PREFIX):
                self.add("TEMPLATE_INVALID", f"规则编号 {rule.id} 以 {AUTO_RULE_PREFIX} 开头，该前缀留给自动生成的规则，请改名")
            getattr(self, f"_check_{rule.kind}")(rule, _rule_label(rule))

    def _field(self, code: str, where: str, scope: _FieldScope | None = None) -> TemplateField | None:
        scope = scope or self.scope
        item = scope.fields.get(code)
        if item is None:
            suggestion = difflib.get_close_matches(code, list(scope.fields), n=1)
            hint = f"（是否想写 {suggestion[0]}？）" if suggestion else ""
            self.add(
                "TEMPLATE_FIELD_UNKNOWN",
                f"{where}引用了不存在的字段 {code}{hint}。请改为模板 {scope.template.code} 的 fields 中已声明的字段代码",
            )
        return item

    def _fields(self, codes: Iterable[str], where: str, *, allow_multi: bool = True) -> list[TemplateField]:
        found = []
        for code in codes:
            item = self._field(code, where)
            if item is None:
                continue
            if item.multi and not allow_multi:
                self.add("TEMPLATE_TYPE_MISMATCH", f"{where}不能使用多值字段 {code}（multi: true），请换用单值字段")
            found.append(item)
        return found

    def _check_not_null(self, rule: NotNullRule, label: str) -> None:
        self._fields(rule.fields, f"{label}的 fields ")
        self._check_when(rule.when, f"{label}的 when ")

    def _check_unique(self, rule: UniqueRule, label: str) -> None:
        self._fields(rule.fields, f"{label}的 fields ", allow_multi=False)
        self._check_when(rule.when, f"{label}的 when ")

    def _check_code_list(self, rule: CodeListRule, label: str) -> None:
        fields = self._fields(rule.fields, f"{label}的 fields ")
        if rule.code_list is not None:
            self._resolve_code_list(rule.code_list, f"{label}")
            for item in fields:
                if item.type != "code":
                    self.add(
                        "TEMPLATE_TYPE_MISMATCH",
                        f"{label}把代码表用于 {item.type} 类型的字段 {item.code}，请把该字段的 type 改为 code",
                    )
        else:
            for item in fields:
                if self.scope.allowed_codes(item) is None and item.code_list is None:
                    self.add(
                        "TEMPLATE_CODE_LIST_UNKNOWN",
                        f"{label}检查字段 {item.code} 的值域，但该字段没有 code_list。请在字段上写 code_list，或在规则上写 code_list",
                    )
        self._check_when(rule.when, f"{label}的 when ")

    def _check_format(self, rule: FormatRule, label: str) -> None:
        fields = self._fields(rule.fields, f"{label}的 fields ")
        if rule.pattern is not None:
            self._check_pattern(rule.pattern, f"{label}的 pattern")
            for item in fields:
                if item.type not in {"text", "code", "integer"}:
                    self.add(
                        "TEMPLATE_TYPE_MISMATCH",
                        f"{label}的 pattern 只适用于 text、code、integer 字段，{item.code} 是 {item.type}",
                    )
        if rule.check is not None:
            for item in fields:
                self._check_check(item, rule.check, f"{label}检查的字段 {item.code}")
        self._check_when(rule.when, f"{label}的 when ")

    def _check_compare(self, rule: CompareRule, label: str) -> None:
        item = self._field(rule.left, f"{label}的 left ")
        if item is not None:
            self._check_comparison(item, rule.op, rule.right, rule.values, f"{label}", self.scope)
            if rule.tolerance is not None and item.type not in NUMERIC_TYPES:
                self.add(
                    "TEMPLATE_TYPE_MISMATCH",
                    f"{label}的 tolerance 只适用于数值比较，{item.code} 是 {item.type} 类型，请删除 tolerance",
                )
        self._check_when(rule.when, f"{label}的 when ")

    def _check_reference(self, rule: ReferenceRule, label: str) -> None:
        multi = [item for item in self._fields(rule.fields, f"{label}的 fields ") if item.multi]
        if multi and len(rule.fields) > 1:
            self.add(
                "TEMPLATE_TYPE_MISMATCH",
                f"{label}的多值字段 {multi[0].code} 只能单独关联，请把它放到只有一个字段的关联规则中",
            )
        if len(rule.fields) != len(rule.target.fields):
            self.add(
                "TEMPLATE_REFERENCE_INVALID",
                f"{label}的 fields 有 {len(rule.fields)} 个字段，target.fields 有 {len(rule.target.fields)} 个，请按顺序一一对应",
            )
        self._check_when(rule.when, f"{label}的 when ")

    def _check_reconcile(self, rule: ReconcileRule, label: str) -> None:
        self._check_aggregate(rule.left, f"{label}的 left", self.scope)
        if rule.tolerance is not None and rule.tolerance.relative is not None and rule.tolerance.relative >= 1:
            self.add(
                "TEMPLATE_INVALID",
                f"{label}的 tolerance.relative 为 {rule.tolerance.relative}，应为小于 1 的比例（0.01 表示 1%）",
            )

    def _check_fluctuation(self, rule: FluctuationRule, label: str) -> None:
        self._check_aggregate(rule.measure, f"{label}的 measure", self.scope)

    def _check_aggregate(self, aggregate: Aggregate, where: str, scope: _FieldScope) -> None:
        if aggregate.field is not None:
            item = self._field(aggregate.field, f"{where}.field ", scope)
            if item is not None and item.type not in NUMERIC_TYPES:
                self.add(
                    "TEMPLATE_TYPE_MISMATCH",
                    f"{where} 对 {item.type} 类型的字段 {item.code} 求和，只能对 integer 或 decimal 字段求和",
                )
        self._check_when(aggregate.when, f"{where}.when ", scope)

    # conditions and comparisons

    def _check_when(self, when: Any, where: str, scope: _FieldScope | None = None) -> None:
        scope = scope or self.scope
        if when is None:
            return
        if isinstance(when, AllOf):
            for clause in when.all:
                self._check_when(clause, where, scope)
            return
        if isinstance(when, AnyOf):
            for clause in when.any:
                self._check_when(clause, where, scope)
            return
        item = self._field(when.field, where, scope)
        if item is None or when.op in _NULL_OPS:
            return
        if item.multi:
            self.add("TEMPLATE_TYPE_MISMATCH", f"{where}对多值字段 {item.code} 只能用 is_null 或 not_null 判断")
            return
        self._check_comparison(item, when.op, when.right, when.values, where, scope)

    def _check_comparison(
        self, left: TemplateField, op: str, right: Operand | None, values: tuple | None, where: str, scope: _FieldScope
    ) -> None:
        left_class = _value_class(left.type)
        if left.multi:
            self.add("TEMPLATE_TYPE_MISMATCH", f"{where}不能比较多值字段 {left.code}（multi: true），请换用单值字段")
            return
        if op in _ORDERING_OPS and left_class == "text":
            self.add(
                "TEMPLATE_TYPE_MISMATCH",
                f"{where}对{FIELD_TYPE_NAMES[left.type]}字段 {left.code} 使用了 {op}。文本和代码只能用 =、!=、in、not_in 比较",
            )
            return
        if values is not None:
            for value in values:
                self._check_constant(left, value, where, scope)
            return
        if right is None:
            return
        if right.value is not None:
            self._check_constant(left, right.value, where, scope)
            return
        right_class, right_label = self._operand_class(right, where, scope)
        if right_class is not None and right_class != left_class:
            self.add(
                "TEMPLATE_TYPE_MISMATCH",
                f"{where}把{_CLASS_NAMES[left_class]}字段 {left.code} 与{_CLASS_NAMES[right_class]}{right_label} 用 {op} 比较，"
                f"类型不一致。请改为比较同类字段：日期比日期，数值比数值，文本比文本",
            )

    def _operand_class(self, operand: Operand, where: str, scope: _FieldScope) -> tuple[str | None, str]:
        if operand.period is not None:
            if operand.period == "start" and scope.template.frequency == "ad_hoc":
                self.add("TEMPLATE_INVALID", f"{where}使用了期初日期，但不定期（ad_hoc）报表没有期初日期。请改用字段或日期常量")
            return "date", f"期{'初' if operand.period == 'start' else '末'}日期"
        if operand.field is not None:
            item = self._field(operand.field, where, scope)
            if item is None:
                return None, ""
            if item.multi:
                self.add("TEMPLATE_TYPE_MISMATCH", f"{where}不能比较多值字段 {item.code}（multi: true），请换用单值字段")
                return None, ""
            return _value_class(item.type), f"字段 {item.code}"
        items = [self._field(code, where, scope) for code in operand.sum or ()]
        for item in items:
            if item is not None and item.type not in NUMERIC_TYPES:
                self.add(
                    "TEMPLATE_TYPE_MISMATCH",
                    f"{where}的 sum 中 {item.code} 是 {item.type} 类型，只能对 integer 或 decimal 字段求和",
                )
        return "number", f"字段 {'+'.join(operand.sum or ())} 之和"

    def _check_constant(self, left: TemplateField, value: Any, where: str, scope: _FieldScope) -> None:
        left_class = _value_class(left.type)
        if left_class == "number":
            if not isinstance(value, (int, float)):
                self.add("TEMPLATE_TYPE_MISMATCH", f"{where}把数值字段 {left.code} 与字符串 {_show(value)} 比较，请写成不加引号的数值")
            return
        if not isinstance(value, str):
            hint = "日期请写成带引号的 'YYYYMMDD'" if left_class == "date" else "代码和文本请加引号"
            self.add(
                "TEMPLATE_TYPE_MISMATCH",
                f"{where}把{FIELD_TYPE_NAMES[left.type]}字段 {left.code} 与数值 {_show(value)} 比较，{hint}",
            )
            return
        if left_class == "date" and not _valid_date_text(value):
            self.add("TEMPLATE_TYPE_MISMATCH", f"{where}的日期 {_show(value)} 无效，请写成带引号的有效日期 'YYYYMMDD'，例如 '20241231'")
            return
        allowed = scope.allowed_codes(left)
        if allowed is not None and value not in allowed:
            known = "、".join(list(allowed)[:20])
            self.add("TEMPLATE_CODE_LIST_MISMATCH", f"{where}的取值 {_show(value)} 不在字段 {left.code} 的代码表中，可选：{known}")


# --- checks across templates -----------------------------------------------------------------------------


def _target_versions(catalog: TemplateCatalog, code: str, version: int | None) -> list[Template] | str:
    if code not in catalog:
        known = "、".join(catalog.codes())
        return f"引用的模板 {code} 不存在。已加载的模板有：{known}。请检查模板代码，或一并提供该模板的文件"
    if version is None:
        return [catalog.get(code, number) for number in catalog.versions(code)]
    if version not in catalog.versions(code):
        return f"引用的模板 {code} 没有第 {version} 版，已有版本：{'、'.join(map(str, catalog.versions(code)))}"
    return [catalog.get(code, version)]


def check_cross_references(template: Template, catalog: TemplateCatalog) -> None:
    """Check reference and reconcile targets. A target without ``version`` must fit every loaded version.

    Raises ``TemplateError`` listing every problem of ``template``.
    """
    problems = _Problems(template.source_path or Path(template.code))
    checker = _TemplateChecker(template, {}, problems)
    for rule in template.rules:
        label = _rule_label(rule)
        if isinstance(rule, ReferenceRule):
            targets = _target_versions(catalog, rule.target.template, rule.target.version)
            if isinstance(targets, str):
                problems.add("TEMPLATE_REFERENCE_UNKNOWN", f"{label}{targets}")
                continue
            for target in targets:
                _check_reference_target(checker, template, rule, target, label)
        elif isinstance(rule, ReconcileRule):
            targets = _target_versions(catalog, rule.right.template, rule.right.version)
            if isinstance(targets, str):
                problems.add("TEMPLATE_REFERENCE_UNKNOWN", f"{label}{targets}")
                continue
            for target in targets:
                _check_reconcile_target(checker, rule, target, label)
    problems.raise_if_any()


def _check_reference_target(
    checker: _TemplateChecker, template: Template, rule: ReferenceRule, target: Template, label: str
) -> None:
    scope = _FieldScope(target, target._resolved_code_lists)
    where = f"{label}的 target.fields（模板 {target.label}）"
    for code, target_code in zip(rule.fields, rule.target.fields):
        target_item = checker._field(target_code, where, scope)
        if target_item is None or not template.has_field(code):
            continue
        if target_item.multi:
            checker.add("TEMPLATE_REFERENCE_INVALID", f"{where}不能关联到多值字段 {target_code}")
        source_class = _value_class(template.field(code).type)
        target_class = _value_class(target_item.type)
        if source_class != target_class:
            checker.add(
                "TEMPLATE_TYPE_MISMATCH",
                f"{label}把{_CLASS_NAMES[source_class]}字段 {code} 关联到{_CLASS_NAMES[target_class]}字段 "
                f"{target.code}.{target_code}，类型不一致。请按顺序对应同类字段",
            )


def _check_reconcile_target(checker: _TemplateChecker, rule: ReconcileRule, target: Template, label: str) -> None:
    scope = _FieldScope(target, target._resolved_code_lists)
    right = rule.right
    if right.aggregate is not None:
        checker._check_aggregate(right.aggregate, f"{label}的 right.aggregate（模板 {target.label}）", scope)
        return
    where = f"{label}的 right（模板 {target.label}）"
    if target.kind != "aggregate":
        checker.add(
            "TEMPLATE_REFERENCE_INVALID",
            f"{where}按项目 line 取数，但 {target.code} 是明细模板。请改用 aggregate 汇总明细表，或改为引用汇总报表",
        )
        return
    if right.line not in {line.code for line in target.lines}:
        known = "、".join(f"{line.code} {line.name}" for line in target.lines[:30])
        checker.add("TEMPLATE_REFERENCE_INVALID", f"{where}的项目 {_show(right.line)} 不在该报表的 lines 中。可选项目：{known}")
    item = checker._field(right.column or "", f"{where}的 column ", scope)
    if item is not None and item.type not in NUMERIC_TYPES:
        checker.add("TEMPLATE_TYPE_MISMATCH", f"{where}的 column {item.code} 是 {item.type} 类型，核对只能取数值列")


# --- derived rules -------------------------------------------------------------------------------------


def _derive_rules(template: Template) -> tuple[Rule, ...]:
    """Build the rules implied by field declarations and the primary key that no explicit rule covers."""
    covered_not_null: set[str] = set()
    covered_code_list: set[str] = set()
    covered_format: set[str] = set()
    primary_key_covered = False
    for rule in template.rules:
        if isinstance(rule, NotNullRule) and rule.when is None:
            covered_not_null.update(rule.fields)
        elif isinstance(rule, CodeListRule) and rule.when is None and rule.code_list is None:
            covered_code_list.update(rule.fields)
        elif isinstance(rule, FormatRule) and rule.when is None and rule.pattern is None and rule.check is None:
            covered_format.update(rule.fields)
        elif isinstance(rule, UniqueRule) and rule.scope == "file" and rule.when is None:
            primary_key_covered = primary_key_covered or set(rule.fields) == set(template.primary_key)

    derived: list[Rule] = []
    if template.primary_key and not primary_key_covered:
        derived.append(
            UniqueRule(
                id=f"{AUTO_RULE_PREFIX}UNIQUE-PK",
                name=f"主键（{'、'.join(template.primary_key)}）在文件内唯一",
                severity="error",
                kind="unique",
                fields=template.primary_key,
            )
        )
    for item in template.fields:
        if item.required and item.code not in covered_not_null:
            derived.append(
                NotNullRule(
                    id=f"{AUTO_RULE_PREFIX}NOTNULL-{item.code}", name=f"{item.name}不能为空", severity="error",
                    kind="not_null", fields=(item.code,),
                )
            )
        has_domain = item.code_list is not None or (template.kind == "aggregate" and item.code == template.line_field)
        if has_domain and item.code not in covered_code_list:
            domain = f"代码表“{item.code_list}”" if item.code_list else "报表项目列表"
            derived.append(
                CodeListRule(
                    id=f"{AUTO_RULE_PREFIX}CODELIST-{item.code}", name=f"{item.name}须为{domain}中的代码",
                    severity="error", kind="code_list", fields=(item.code,),
                )
            )
        if item.code not in covered_format:
            derived.append(
                FormatRule(
                    id=f"{AUTO_RULE_PREFIX}FORMAT-{item.code}", name=f"{item.name}须符合{FIELD_TYPE_NAMES[item.type]}格式",
                    severity="error", kind="format", fields=(item.code,),
                )
            )
    return tuple(derived)
