"""Masking policies: a versioned YAML file that maps column classes to treatments, signed when approved.

A policy file (see ``extracts/policies/default.v1.yaml``) has ``format``, ``name``, ``version`` and
a list of ``rules``. A rule matches column classes (:class:`catalog.classes.ColumnClass`) by
``levels`` (1–5), ``pi_categories`` (``C1``, ``C2``, ``C3`` or ``none``) and ``kinds``; an
omitted criterion matches every value. The rules must partition the class space: every
combination of level, category and kind is matched by exactly one rule. A gap or an overlap is
an error, so the treatment of a column never depends on rule order.

Treatments and the kinds they fit:

- ``drop``: the column is left out of the extract. Any kind. Mandatory for C3.
- ``token``: HMAC-SM3 of the value under the institution's tokenisation key, its first 128 bits as 32 hex digits.
  Any kind except ``auth_secret``.
- ``partial_mask``: ``mobile`` keeps the first 3 and last 4 characters, ``resident_id`` and
  ``bank_card`` the first 6 and last 4, ``person_name`` the surname (two characters for the
  compound surnames in :data:`COMPOUND_SURNAMES`). Other characters become ``*``. A value not
  longer than the kept characters becomes all ``*``, so a short value is never kept whole.
- ``generalise``: ``birth_date`` becomes its year, ``address`` its province and city, ``amount``
  the label of the band it falls in (the rule declares ``bands``).
- ``keep``: the value as it is. Only for levels 1–3 and category C1 or none, so C2 and C3
  values, level 4 and 5 columns and unconfirmed columns (level 4) are never kept.

An optional ``quasi_identifiers`` mapping declares, per extract table (template code, or
``applications`` for the demo table), the columns an outsider could link with other data to
single out a person or company in the masked output. The k-anonymity report of each extract
(:mod:`extracts.kanon`) groups the records by these columns. A column may declare a
generalisation: ``bands`` (numeric value to the label of its band) or ``prefix`` (the first N
characters, such as the 4-digit prefecture of a 6-digit region code or the year of a date). The
generalisation replaces the treatment only where the rule of the column's class is ``keep``. Any
other treatment is already coarser or opaque and stays in place.

Loading validates all of this and raises :class:`PolicyInvalid` with a stable code and a Chinese
message naming the rule and the fix. Approval (:func:`approve_policy`) stores a copy of the file
under ``<data_dir>/policies/masking/`` and signs it with the platform SM2 key
(:func:`regsandbox_core.signing.sign_file`); :func:`load_approved_policy` verifies that signature
and the builder accepts only policies loaded that way.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from catalog.classes import KINDS, PI_CATEGORIES, SECURITY_LEVELS, ColumnClass
from regsandbox_core.crypto import sm3_file, sm3_hex
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_output, make_private_dirs
from regsandbox_core.keystore import KeyStore, KeyStoreError
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, SignedObjectInvalid, sign_file, signature_path, verify_file

logger = logging.getLogger(__name__)

POLICY_FORMAT = "regsandbox-masking-policy/1"
POLICY_SIGNATURE_KIND = "masking_policy"
DEFAULT_POLICY_FILE = Path(__file__).resolve().parent / "policies" / "default.v1.yaml"
NO_CATEGORY = "none"

TREATMENTS = {
    "drop": "删除",
    "token": "HMAC-SM3 令牌化",
    "partial_mask": "部分遮盖",
    "generalise": "泛化",
    "keep": "保留",
}

PARTIAL_MASKS: dict[str, tuple[int, int]] = {
    "mobile": (3, 4),
    "resident_id": (6, 4),
    "bank_card": (6, 4),
}
"""Characters kept at the start and at the end by ``partial_mask``; ``person_name`` keeps the surname."""

COMPOUND_SURNAMES: tuple[str, ...] = (
    "欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙",
    "宇文", "司徒", "夏侯", "令狐", "端木", "独孤", "南宫", "西门", "万俟", "闻人",
)

GENERALISATIONS: dict[str, str] = {"birth_date": "年份", "address": "省、市", "amount": "金额区间"}
KEEP_MAX_LEVEL = 3
KEEP_CATEGORIES = (None, "C1")

_RULE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_PREFIX = 32
"""Largest ``prefix`` of a quasi-identifier generalisation, in characters."""
_POLICY_NAME_FILE = re.compile(r"^v([1-9][0-9]{0,5})\.yaml$")
_CATEGORY_VALUES: tuple[str | None, ...] = (*PI_CATEGORIES, None)


class PolicyInvalid(RegsandboxError):
    """A masking policy file that cannot be used: the code names the check that failed."""


class PolicyNotApproved(RegsandboxError):
    """No approved policy, or an approved policy whose signature does not verify."""

    status = 409


@dataclass(frozen=True)
class Band:
    """An amount band: values below ``below`` (None for the last, open band) get ``label``."""

    below: Decimal | None
    label: str


@dataclass(frozen=True)
class Rule:
    """One policy rule: the classes it matches and their treatment."""

    id: str
    treatment: str
    levels: frozenset[int]
    pi_categories: frozenset[str | None]
    kinds: frozenset[str]
    bands: tuple[Band, ...] = ()
    description: str = ""

    def matches(self, column_class: ColumnClass) -> bool:
        return (column_class.level in self.levels and column_class.pi_category in self.pi_categories
                and column_class.kind in self.kinds)


@dataclass(frozen=True)
class QuasiIdentifier:
    """A declared quasi-identifier column of one extract table and its optional generalisation."""

    table: str
    column: str
    bands: tuple[Band, ...] = ()
    prefix: int = 0
    description: str = ""

    def generalisation(self) -> dict[str, Any] | None:
        """Return the generalisation as recorded in a manifest, or None when the column is only declared."""
        if self.bands:
            return {"bands": [band.label for band in self.bands]}
        if self.prefix:
            return {"prefix": self.prefix}
        return None


@dataclass(frozen=True)
class MaskingPolicy:
    """A validated masking policy. ``sm3`` is the digest of its file; ``signature_key`` is set once verified."""

    name: str
    version: int
    rules: tuple[Rule, ...]
    sm3: str
    description: str = ""
    path: Path | None = None
    signature_key: str | None = field(default=None, compare=False)
    quasi_identifiers: tuple[QuasiIdentifier, ...] = ()

    def quasi_identifiers_of(self, table: str) -> tuple[QuasiIdentifier, ...]:
        """Return the declared quasi-identifiers of a catalog table (template code or ``applications``)."""
        return tuple(item for item in self.quasi_identifiers if item.table == table)

    def rule_for(self, column_class: ColumnClass) -> Rule:
        """Return the one rule that matches ``column_class`` (validation guarantees exactly one)."""
        for rule in self.rules:
            if rule.matches(column_class):
                return rule
        raise PolicyInvalid("POLICY_RULE_MISSING", f"脱敏策略 {self.name} 第 {self.version} 版没有适用于 {describe_class(column_class)} 的规则。")

    def manifest_entry(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sm3": self.sm3, "signature_key": self.signature_key}


def describe_class(column_class: ColumnClass) -> str:
    """Return the class in the words of the console: level, category and kind."""
    category = column_class.pi_category or "非个人信息"
    return f"{column_class.level} 级 / {category} / {KINDS[column_class.kind]}（{column_class.kind}）"


# --- parsing ---------------------------------------------------------------------------------


def _fail(code: str, message: str) -> PolicyInvalid:
    return PolicyInvalid(code, message)


def _list(rule_id: str, match: dict, key: str) -> list | None:
    value = match.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _fail("POLICY_RULE_INVALID", f"规则 {rule_id} 的 match.{key} 必须是非空列表，例如 {key}: [C2]；省略则匹配全部取值。")
    return value


def _parse_match(rule_id: str, match: object) -> tuple[frozenset[int], frozenset[str | None], frozenset[str]]:
    if match is None:
        match = {}
    if not isinstance(match, dict):
        raise _fail("POLICY_RULE_INVALID", f"规则 {rule_id} 的 match 必须是对象，包含 levels、pi_categories、kinds 中的若干项。")
    unknown = set(match) - {"levels", "pi_categories", "kinds"}
    if unknown:
        raise _fail("POLICY_RULE_INVALID", f"规则 {rule_id} 的 match 含有未知条件 {'、'.join(sorted(map(str, unknown)))}；只允许 levels、pi_categories、kinds。")

    levels = _list(rule_id, match, "levels")
    if levels is None:
        levels = list(SECURITY_LEVELS)
    for level in levels:
        if isinstance(level, bool) or level not in SECURITY_LEVELS:
            raise _fail("POLICY_LEVEL_UNKNOWN", f"规则 {rule_id} 中的数据安全级别 {level!r} 无效，应为 1–5 的整数（JR/T 0197-2020）。")

    categories = _list(rule_id, match, "pi_categories")
    parsed_categories: list[str | None] = []
    for category in categories if categories is not None else [*PI_CATEGORIES, NO_CATEGORY]:
        if category == NO_CATEGORY:
            parsed_categories.append(None)
        elif category in PI_CATEGORIES:
            parsed_categories.append(category)
        else:
            raise _fail("POLICY_CATEGORY_UNKNOWN", f"规则 {rule_id} 中的个人金融信息类别 {category!r} 无效，应为 C1、C2、C3 或 none（非个人信息）。")

    kinds = _list(rule_id, match, "kinds")
    for kind in kinds if kinds is not None else []:
        if kind not in KINDS:
            raise _fail("POLICY_KIND_UNKNOWN", f"规则 {rule_id} 中的字段类型 {kind!r} 未定义。可用类型：{'、'.join(KINDS)}。")
    return frozenset(levels), frozenset(parsed_categories), frozenset(kinds if kinds is not None else KINDS)


def _parse_bands(owner: str, raw: object) -> tuple[Band, ...]:
    """Parse the ``bands`` of ``owner`` (such as ``规则 band-amount``, named in the messages)."""
    if not isinstance(raw, list) or len(raw) < 2:
        raise _fail("POLICY_BANDS_INVALID", f"{owner} 做区间泛化，须在 bands 中声明至少两个区间，例如 - {{below: 10000, label: '[0, 1万)'}} 和最后一个不带 below 的区间。")
    bands: list[Band] = []
    for index, item in enumerate(raw, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("label"), str) or not item["label"].strip():
            raise _fail("POLICY_BANDS_INVALID", f"{owner} 的第 {index} 个区间缺少 label（区间名称）。")
        below = item.get("below")
        last = index == len(raw)
        if last and below is not None:
            raise _fail("POLICY_BANDS_INVALID", f"{owner} 的最后一个区间 {item['label']} 不得有 below 上限，以便容纳所有更大的值。")
        if not last:
            try:
                below = Decimal(str(below))
            except (InvalidOperation, ValueError):
                raise _fail("POLICY_BANDS_INVALID", f"{owner} 的区间 {item['label']} 的 below 上限 {below!r} 不是数字。") from None
            if not below.is_finite() or (bands and below <= bands[-1].below):  # type: ignore[operator]
                raise _fail("POLICY_BANDS_INVALID", f"{owner} 的区间上限须为有限数且严格递增，区间 {item['label']} 的上限 {below} 不满足。")
        bands.append(Band(below, item["label"].strip()))
    labels = [band.label for band in bands]
    if len(set(labels)) != len(labels):
        raise _fail("POLICY_BANDS_INVALID", f"{owner} 的区间名称重复：{'、'.join(labels)}。")
    return tuple(bands)


def _check_fit(rule: Rule) -> None:
    """Raise unless the treatment fits every kind the rule matches and the keep and C3 limits hold."""
    if rule.treatment != "drop" and "C3" in rule.pi_categories:
        raise _fail("POLICY_C3_NOT_DROPPED",
                    f"规则 {rule.id} 对 C3 类个人金融信息（用户鉴别信息）使用 {TREATMENTS[rule.treatment]}（{rule.treatment}）。"
                    "JR/T 0171-2020 要求 C3 信息不得进入数据提取：请把 C3 从该规则的 pi_categories 中去掉，并用 treatment: drop 的规则处理 C3。")
    if rule.treatment == "partial_mask":
        misfits = sorted(rule.kinds - set(PARTIAL_MASKS) - {"person_name"})
        if misfits:
            raise _fail("POLICY_TREATMENT_KIND_MISMATCH",
                        f"规则 {rule.id} 对 {'、'.join(misfits)} 使用部分遮盖，但部分遮盖只适用于手机号码（mobile）、居民身份证号码（resident_id）、"
                        "银行卡号（bank_card）和个人姓名（person_name）。请用 kinds 限定这些类型，其他类型改用 token 或 drop。")
    if rule.treatment == "generalise":
        misfits = sorted(rule.kinds - set(GENERALISATIONS))
        if misfits:
            raise _fail("POLICY_TREATMENT_KIND_MISMATCH",
                        f"规则 {rule.id} 对 {'、'.join(misfits)} 使用泛化，但泛化只适用于出生日期（birth_date→年份）、地址（address→省市）"
                        "和金额（amount→区间）。请用 kinds 限定这些类型。")
        if "amount" in rule.kinds and not rule.bands:
            raise _fail("POLICY_BANDS_INVALID", f"规则 {rule.id} 对金额（amount）做泛化，须在 bands 中声明区间。")
    if rule.treatment != "generalise" and rule.bands:
        raise _fail("POLICY_BANDS_INVALID", f"规则 {rule.id} 的处理方式为 {rule.treatment}，不应声明 bands；bands 只用于金额区间泛化。")
    if rule.treatment in ("token", "keep") and "auth_secret" in rule.kinds:
        raise _fail("POLICY_TREATMENT_KIND_MISMATCH",
                    f"规则 {rule.id} 对鉴别信息（auth_secret）使用 {rule.treatment}；密码、口令、生物特征等鉴别信息只能删除（drop）。")
    if rule.treatment == "keep":
        high = sorted(level for level in rule.levels if level > KEEP_MAX_LEVEL)
        personal = sorted(str(category) for category in rule.pi_categories if category not in KEEP_CATEGORIES)
        if high or personal:
            what = "、".join([*(f"{level} 级" for level in high), *personal])
            raise _fail("POLICY_KEEP_NOT_ALLOWED",
                        f"规则 {rule.id} 保留原值（keep）的范围包含 {what}。原值只能保留 1–3 级、C1 或非个人信息的列；"
                        "4 级及以上（含未经确认分类、按 4 级处理的列）和 C2 信息须令牌化、遮盖、泛化或删除。")


def _parse_rule(index: int, raw: object) -> Rule:
    if not isinstance(raw, dict):
        raise _fail("POLICY_RULE_INVALID", f"第 {index} 条规则必须是对象，包含 id、match 和 treatment。")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
        raise _fail("POLICY_RULE_INVALID", f"第 {index} 条规则的 id {rule_id!r} 无效：须为小写字母、数字、连字符或下划线，最长 64 位，例如 drop-c3。")
    unknown = set(raw) - {"id", "match", "treatment", "bands", "description"}
    if unknown:
        raise _fail("POLICY_RULE_INVALID", f"规则 {rule_id} 含有未知字段 {'、'.join(sorted(map(str, unknown)))}。")
    treatment = raw.get("treatment")
    if treatment not in TREATMENTS:
        raise _fail("POLICY_TREATMENT_UNKNOWN", f"规则 {rule_id} 的处理方式 {treatment!r} 无效，应为 {'、'.join(TREATMENTS)} 之一。")
    levels, categories, kinds = _parse_match(rule_id, raw.get("match"))
    bands = _parse_bands(f"规则 {rule_id}", raw["bands"]) if raw.get("bands") is not None else ()
    description = raw.get("description") or ""
    rule = Rule(rule_id, treatment, levels, categories, kinds, bands, str(description))
    _check_fit(rule)
    return rule


def _check_partition(rules: list[Rule], name: str) -> None:
    """Raise unless every (level, category, kind) is matched by exactly one rule."""
    for level, category, kind in itertools.product(SECURITY_LEVELS, _CATEGORY_VALUES, KINDS):
        column_class = ColumnClass(level, category, kind)  # type: ignore[arg-type]
        matching = [rule.id for rule in rules if rule.matches(column_class)]
        if not matching:
            raise _fail("POLICY_RULE_MISSING",
                        f"脱敏策略 {name} 没有适用于 {describe_class(column_class)} 的规则。每种级别、类别和类型的组合都须恰好由一条规则处理，请补充规则。")
        if len(matching) > 1:
            raise _fail("POLICY_RULE_OVERLAP",
                        f"脱敏策略 {name} 中规则 {'、'.join(matching)} 同时适用于 {describe_class(column_class)}。"
                        "每种组合只能由一条规则处理，请用 match 条件把这些规则分开。")


def _parse_quasi_identifier(table: str, index: int, raw: object) -> QuasiIdentifier:
    where = f"quasi_identifiers.{table} 的第 {index} 项"
    if not isinstance(raw, dict) or not isinstance(raw.get("column"), str) or not _COLUMN_NAME.match(raw["column"]):
        raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                    f"{where}须为对象并含 column（字段代码，字母、数字或下划线，最长 64 位），例如 - {{column: XZQHDM, prefix: 4}}。")
    column = raw["column"]
    unknown = set(raw) - {"column", "bands", "prefix", "description"}
    if unknown:
        raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                    f"准标识符 {table}.{column} 含有未知字段 {'、'.join(sorted(map(str, unknown)))}；只允许 column、bands、prefix、description。")
    if raw.get("bands") is not None and raw.get("prefix") is not None:
        raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                    f"准标识符 {table}.{column} 同时声明了 bands 和 prefix；每列只能选一种泛化方式。")
    bands = _parse_bands(f"准标识符 {table}.{column}", raw["bands"]) if raw.get("bands") is not None else ()
    prefix = raw.get("prefix")
    if prefix is None:
        prefix = 0
    elif isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= MAX_PREFIX:
        raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                    f"准标识符 {table}.{column} 的 prefix {prefix!r} 无效，应为 1–{MAX_PREFIX} 的整数（保留的前导字符数），"
                    "例如行政区划代码保留前 4 位为 prefix: 4。")
    return QuasiIdentifier(table, column, bands, prefix, str(raw.get("description") or ""))


def _parse_quasi_identifiers(name: str, raw: object) -> tuple[QuasiIdentifier, ...]:
    """Validate the ``quasi_identifiers`` mapping (table -> list of columns) of policy ``name``."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                    f"脱敏策略 {name} 的 quasi_identifiers 须为对象：键为数据表（模板代码或 applications），值为准标识符列的列表。")
    declared: list[QuasiIdentifier] = []
    for table, columns in raw.items():
        if not isinstance(table, str) or not _TABLE_NAME.match(table):
            raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                        f"脱敏策略 {name} 的 quasi_identifiers 中数据表名 {table!r} 无效：须为模板代码（字母、数字、下划线、点或连字符，最长 64 位）。")
        if not isinstance(columns, list) or not columns:
            raise _fail("POLICY_QUASI_IDENTIFIER_INVALID",
                        f"quasi_identifiers.{table} 须为非空列表；不需要准标识符的表请整项删除。")
        parsed = [_parse_quasi_identifier(table, index, item) for index, item in enumerate(columns, start=1)]
        names = [item.column for item in parsed]
        duplicates = sorted({column for column in names if names.count(column) > 1})
        if duplicates:
            raise _fail("POLICY_QUASI_IDENTIFIER_INVALID", f"quasi_identifiers.{table} 中字段重复：{'、'.join(duplicates)}。")
        declared.extend(parsed)
    return tuple(declared)


def parse_policy(document: object, *, sm3: str, path: Path | None = None) -> MaskingPolicy:
    """Validate a parsed policy document and return the policy; raise :class:`PolicyInvalid` on the first fault."""
    if not isinstance(document, dict):
        raise _fail("POLICY_FORMAT_INVALID", "脱敏策略文件必须是 YAML 对象，包含 format、name、version 和 rules。")
    if document.get("format") != POLICY_FORMAT:
        raise _fail("POLICY_FORMAT_INVALID", f"脱敏策略的 format 为 {document.get('format')!r}，本平台只接受 {POLICY_FORMAT}。")
    name = document.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail("POLICY_FORMAT_INVALID", "脱敏策略缺少 name（策略名称）。")
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 999999:
        raise _fail("POLICY_VERSION_INVALID", f"脱敏策略 {name} 的 version {version!r} 无效，应为 1–999999 的整数，每次修改后加一。")
    unknown = set(document) - {"format", "name", "version", "description", "rules", "quasi_identifiers"}
    if unknown:
        raise _fail("POLICY_FORMAT_INVALID", f"脱敏策略 {name} 含有未知字段 {'、'.join(sorted(map(str, unknown)))}。")
    raw_rules = document.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _fail("POLICY_FORMAT_INVALID", f"脱敏策略 {name} 缺少 rules 列表。")
    rules = [_parse_rule(index, raw) for index, raw in enumerate(raw_rules, start=1)]
    identifiers = [rule.id for rule in rules]
    duplicates = sorted({rule_id for rule_id in identifiers if identifiers.count(rule_id) > 1})
    if duplicates:
        raise _fail("POLICY_RULE_INVALID", f"脱敏策略 {name} 中规则 id 重复：{'、'.join(duplicates)}。")
    _check_partition(rules, name)
    quasi_identifiers = _parse_quasi_identifiers(name, document.get("quasi_identifiers"))
    return MaskingPolicy(name=name.strip(), version=version, rules=tuple(rules), sm3=sm3,
                         description=str(document.get("description") or ""), path=path,
                         quasi_identifiers=quasi_identifiers)


def load_policy(path: Path) -> MaskingPolicy:
    """Read and validate a policy file (not its signature); raise :class:`PolicyInvalid` when it is unusable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _fail("POLICY_FILE_UNREADABLE", f"无法读取脱敏策略文件 {path}（{error.strerror}）。请检查路径和权限。") from None
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise _fail("POLICY_FORMAT_INVALID", f"脱敏策略文件 {path} 不是合法的 UTF-8 YAML（{type(error).__name__}）。") from None
    return parse_policy(document, sm3=sm3_hex(data), path=path)


# --- approval and signature -----------------------------------------------------------------------


def approved_dir(settings: Settings) -> Path:
    """Return ``<data_dir>/policies/masking``, where approved policies and their signatures live."""
    return settings.data_dir / "policies" / "masking"


def approved_path(settings: Settings, version: int) -> Path:
    return approved_dir(settings) / f"v{version}.yaml"


def approved_versions(settings: Settings) -> list[int]:
    folder = approved_dir(settings)
    if not folder.is_dir():
        return []
    return sorted(int(match.group(1)) for path in folder.iterdir() if (match := _POLICY_NAME_FILE.match(path.name)))


def approve_policy(settings: Settings, keystore: KeyStore, source: Path) -> MaskingPolicy:
    """Validate ``source``, store it as approved version ``v<version>.yaml`` and sign it with the platform key.

    An approved version is immutable: approving the same version again with the same content
    returns it unchanged, and with other content raises ``POLICY_VERSION_EXISTS``.
    """
    policy = load_policy(source)
    target = approved_path(settings, policy.version)
    if target.exists():
        existing = sm3_file(target)
        if existing != policy.sm3:
            raise PolicyInvalid(
                "POLICY_VERSION_EXISTS",
                f"脱敏策略第 {policy.version} 版已审批且内容不同（SM3 {existing[:16]}…）。已审批的版本不可修改，请把 version 加一后重新提交审批。",
                status=409,
            )
        if signature_path(target).exists():
            return load_approved_policy(settings, keystore, policy.version)
    make_private_dirs(approved_dir(settings), settings.data_dir)
    with atomic_output(target) as stream:
        stream.write(Path(source).read_bytes())
    try:
        sign_file(keystore, target, kind=POLICY_SIGNATURE_KIND)
    except KeyStoreError as error:
        target.unlink(missing_ok=True)
        raise PolicyNotApproved(
            "POLICY_SIGNING_KEY_MISSING",
            f"无法用平台签名密钥签署脱敏策略第 {policy.version} 版（{error.code}）。请先运行 `regsandbox init` 或由密钥管理员启用平台签名密钥。",
        ) from error
    logger.info("approved masking policy %s version %s (sm3 %s)", policy.name, policy.version, policy.sm3)
    return load_approved_policy(settings, keystore, policy.version)


def load_approved_policy(settings: Settings, keystore: KeyStore, version: int | None = None) -> MaskingPolicy:
    """Return an approved policy (default: the highest version) after verifying its SM2 signature.

    Raises :class:`PolicyNotApproved` (``POLICY_NOT_APPROVED``, ``POLICY_SIGNATURE_INVALID``) and
    :class:`PolicyInvalid` when the stored file no longer validates.
    """
    versions = approved_versions(settings)
    if version is None:
        if not versions:
            raise PolicyNotApproved(
                "POLICY_NOT_APPROVED",
                f"{approved_dir(settings)} 中没有已审批的脱敏策略。请先审批脱敏策略（python -m extracts policy approve 策略文件）。",
            )
        version = versions[-1]
    path = approved_path(settings, version)
    if version not in versions:
        raise PolicyNotApproved("POLICY_NOT_APPROVED", f"脱敏策略第 {version} 版未经审批（{path} 不存在）。")
    return verified_policy(path, keystore)


def verified_policy(path: Path, keystore: KeyStore) -> MaskingPolicy:
    """Load a policy file and verify its detached SM2 signature ``<path>.sig`` against the key store."""
    try:
        verified = verify_file(path, keystore)
    except (SignatureInvalid, SignedObjectInvalid) as error:
        raise PolicyNotApproved(
            "POLICY_SIGNATURE_INVALID",
            f"脱敏策略 {path} 的签名验证失败，拒绝使用：{error.message} 请重新审批该策略。",
        ) from error
    if verified.kind != POLICY_SIGNATURE_KIND:
        raise PolicyNotApproved("POLICY_SIGNATURE_INVALID",
                                f"脱敏策略 {path} 的签名类型为 {verified.kind}，不是脱敏策略签名（{POLICY_SIGNATURE_KIND}）。")
    policy = load_policy(path)
    if policy.sm3 != verified.sm3:  # the file changed between verification and reading
        raise PolicyNotApproved("POLICY_SIGNATURE_INVALID", f"脱敏策略 {path} 在验证签名后被修改，拒绝使用。")
    return replace(policy, path=path, signature_key=verified.key)


def ensure_default_policy(settings: Settings, keystore: KeyStore) -> MaskingPolicy:
    """Return the newest approved policy; when none is approved yet, approve the shipped default first."""
    if approved_versions(settings):
        return load_approved_policy(settings, keystore)
    logger.warning("no approved masking policy in %s; approving the shipped default %s",
                   approved_dir(settings), DEFAULT_POLICY_FILE)
    return approve_policy(settings, keystore, DEFAULT_POLICY_FILE)

