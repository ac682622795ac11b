"""Detectors that propose a :class:`~catalog.classes.ColumnClass` for a warehouse column.

A proposal rests on two kinds of evidence:

- the column's declaration in its report template: the field code, the Chinese name (EAST names
  such as 证件号码, 客户名称, 手机号码, 账号), the type, the ``format.check`` that intake enforces on
  every value, and the template's format rules that check the field under a condition;
- sampled values: the share of non-empty samples that pass a check (resident ID with the GB 11643
  check digit, 统一社会信用代码 with the GB 32100 check character, bank card with the Luhn digit,
  mobile number, Chinese person name, address, organisation name).

Evidence records counts and never a value, so a proposal can be stored and shown without
exposing the data it was computed from. The detectors only propose: a data steward confirms or
changes each class, and until then the column is masked at level 4 (:func:`catalog.classes.effective_class`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from stdnum import luhn
from stdnum.cn import ric, uscc
from stdnum.exceptions import ValidationError

from catalog.classes import KINDS, ColumnClass, PiCategory
from catalog.surnames import surname_of
from intake.template_model import FormatRule, Template, TemplateField

# --- default classes of each kind ------------------------------------------------------------------

# Default proposal of each kind: (JR/T 0197 level, JR/T 0171 category or None).
#
# Modelled on the two standards as summarised in catalog.classes. JR/T 0171-2020 sorts personal
# financial information into C3 (authentication data: passwords, card verification data,
# biometrics used to authenticate), C2 (information that identifies the person or their accounts,
# such as the resident ID number, bank card number and mobile number) and C1 (other personal
# financial information held for the institution's internal use). The levels follow the category
# floors of catalog.classes.CATEGORY_MIN_LEVELS (our reading of JR/T 0197-2020: C3 at level 4, C2
# at level 3, C1 at level 2), raised by one for the two C2 identifiers that alone single out a
# person and open their money: the resident ID number and the bank card number.
#
# Level 5 (重要数据) is not proposed for any single column: JR/T 0197 reserves it for data whose
# leak may affect national security or the public interest, which a steward judges for a whole
# data set, not a detector for one column. Organisation identifiers and names are not personal
# information (no category). The 金融许可证号 of an institution is published by the regulator (level 1).
DEFAULT_CLASSES: dict[str, tuple[int, PiCategory | None]] = {
    "auth_secret": (4, "C3"),   # C3 authentication data; the masking policy drops it
    "resident_id": (4, "C2"),   # C2, identifies one person for life
    "bank_card": (4, "C2"),     # C2 payment account, enough to attempt card fraud
    "account_no": (3, "C2"),    # C2 account information
    "mobile": (3, "C2"),        # C2 contact identifier
    "phone": (3, "C2"),         # C2 contact identifier; may be a landline
    "person_name": (3, "C2"),   # C2 personal identity information
    "address": (3, "C2"),       # C2 personal identity information
    "birth_date": (3, "C2"),    # C2 personal identity information
    "customer_no": (3, "C1"),   # institution-internal identifier of a customer
    "contract_no": (3, "C1"),   # institution-internal identifier of a contract, loan or transaction
    "amount": (3, "C1"),        # balances and amounts of a customer's business with the institution
    "free_text": (3, "C1"),     # remarks and purposes may mention a person, so treated as personal
    "uscc": (2, None),          # registered organisation code, not personal
    "org_code": (2, None),
    "org_name": (2, None),
    "licence_no": (1, None),    # published by the regulator
    "other": (2, None),         # codes, dates, flags and business fields without a personal link
}

# --- evidence and proposals ------------------------------------------------------------------------

SOURCE_NAMES = {
    "format_check": "模板格式校验",
    "rule_check": "模板条件校验规则",
    "name": "字段代码与中文名称",
    "type": "字段类型",
    "values": "数据抽样",
    "default": "无匹配特征",
}


@dataclass(frozen=True)
class Evidence:
    """One reason for a proposal. ``matched`` and ``sampled`` count sampled values; they are never values."""

    source: str
    """One of :data:`SOURCE_NAMES`."""
    kind: str
    confidence: float
    detail: str
    """Chinese explanation shown to the data steward."""
    matched: int | None = None
    sampled: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class Proposal:
    """A proposed class with the confidence (0–1) of its kind and every piece of evidence considered."""

    column_class: ColumnClass
    confidence: float
    evidence: tuple[Evidence, ...] = field(default_factory=tuple)

    def evidence_dicts(self) -> list[dict[str, Any]]:
        return [item.as_dict() for item in self.evidence]


def default_class(kind: str) -> ColumnClass:
    """Return the default class of ``kind`` (see :data:`DEFAULT_CLASSES`)."""
    level, category = DEFAULT_CLASSES[kind]
    return ColumnClass(level=level, pi_category=category, kind=kind)


# --- detection from the template -------------------------------------------------------------------

CHECK_KINDS = {"resident_id": "resident_id", "uscc": "uscc", "org_code": "org_code", "bank_card": "bank_card",
               "mobile": "mobile", "license_no": "licence_no"}
"""Kind of each ``format.check`` of intake.template_model.CHECKS."""

CHECK_CONFIDENCE = 0.95
"""Intake rejects every value of the field that fails the check, so the check names the kind almost surely."""
RULE_CHECK_CONFIDENCE = 0.85
"""A check under a ``when`` condition covers only some rows (e.g. those whose 证件类型 is 01)."""


@dataclass(frozen=True)
class _NameRule:
    kind: str
    name: re.Pattern[str]
    code: re.Pattern[str] | None
    confidence: float


def _rule(kind: str, name: str, code: str | None, confidence: float) -> _NameRule:
    return _NameRule(kind, re.compile(name), re.compile(code) if code else None, confidence)


# Checked in order; the first rule whose Chinese name or code pattern matches wins. "id_number" and
# "party_name" are resolved to a kind of KINDS from the context (see _resolve_id_number, _resolve_party_name).
_NAME_RULES = (
    _rule("auth_secret", r"密码|口令|验证码|安全码|CVV|CVN|磁道|卡片有效期|生物特征|指纹|人脸|声纹|虹膜",
          r"^(MM|[A-Z]*MM)$", 0.9),
    _rule("licence_no", r"金融许可证号", None, 0.9),
    _rule("uscc", r"统一社会信用代码", None, 0.9),
    _rule("org_code", r"组织机构代码", None, 0.9),
    _rule("resident_id", r"身份证", None, 0.9),
    _rule("id_number", r"证件号码|证件号|证照号码", r"ZJHM$", 0.8),
    _rule("bank_card", r"卡号", None, 0.8),
    _rule("account_no", r"账号|帐号|账户号|帐户号", None, 0.75),
    _rule("mobile", r"手机|移动电话", r"SJHM$", 0.85),
    _rule("phone", r"电话|联系方式", r"DH$|LXDH", 0.75),
    _rule("birth_date", r"出生日期|出生年月|生日", r"CSRQ$", 0.85),
    _rule("address", r"地址|住址|住所|居住地|通讯地", r"DZ$", 0.8),
    _rule("person_name", r"姓名", r"XM$", 0.85),
    _rule("free_text", r"物名称", None, 0.6),
    _rule("other", r"项目名称|项目代码", None, 0.6),
    _rule("party_name", r"名称|户名", r"MC$|HM$", 0.7),
    _rule("customer_no", r"客户统一编号|客户号|客户编号", r"^KHTYBH$|^KHH$", 0.7),
    _rule("contract_no", r"合同号|借据号|流水号|票据号|保单号", None, 0.65),
    _rule("free_text", r"备注|摘要|用途|原因|说明", None, 0.6),
)

_PERSON_CONTEXT = re.compile(r"法定代表人|负责人|联系人|个人|自然人|姓名|身份证")
_ORGANISATION_CONTEXT = re.compile(r"机构|银行|单位|企业|公司|法人")
_OTHER_PARTY = re.compile(r"对方|交易对手|担保人|抵质押人|保证人|收款人|付款人")
_AMOUNT_NAME = re.compile(r"金额|余额|资本|价值|本金|利息|欠息|合计|人民币|外币|收入|资产|负债")
_CORPORATE_TABLE = re.compile(r"对公|单位|企业|公司")


def _field_checks(template: Template, item: TemplateField) -> tuple[str | None, set[str]]:
    """Return the field's own ``format.check`` and the checks of conditional format rules on it."""
    own = item.format.check if item.format else None
    conditional = {
        rule.check for rule in template.effective_rules()
        if isinstance(rule, FormatRule) and rule.check and item.code in rule.fields and rule.check != own
    }
    return own, conditional


def _corporate(template: Template) -> bool:
    return bool(_CORPORATE_TABLE.search(template.name))


def _resolve_id_number(template: Template, item: TemplateField, checks: set[str]) -> tuple[str, str]:
    """Choose resident_id or uscc/org_code for a 证件号码 column; return (kind, reason).

    Ambiguous columns get the stricter kind (resident ID), so a wrong guess masks more, never less.
    """
    if "resident_id" in checks:
        return "resident_id", "模板的条件校验规则对该字段做居民身份证校验，按较严格的个人证件类别建议"
    if _PERSON_CONTEXT.search(item.name) or _OTHER_PARTY.search(item.name) and not checks:
        return "resident_id", "字段名称指向个人或可能为个人的当事人，按居民身份证号码建议"
    if "uscc" in checks:
        return "uscc", "模板的条件校验规则对该字段做统一社会信用代码校验"
    if "org_code" in checks:
        return "org_code", "模板的条件校验规则对该字段做组织机构代码校验"
    if _corporate(template):
        return "uscc", f"所在报表“{template.name}”为对公报表，证件号码按统一社会信用代码建议"
    return "resident_id", "未能判断证件种类，按较严格的居民身份证号码建议"


def _resolve_party_name(template: Template, item: TemplateField) -> tuple[str, str]:
    """Choose person_name or org_name for a 名称/户名 column; return (kind, reason)."""
    if _ORGANISATION_CONTEXT.search(item.name):
        return "org_name", "字段名称指向机构或单位"
    if _PERSON_CONTEXT.search(item.name):
        return "person_name", "字段名称指向个人"
    if _OTHER_PARTY.search(item.name):
        return "person_name", "交易对手或担保人可能为个人，按较严格的个人姓名建议"
    if _corporate(template):
        return "org_name", f"所在报表“{template.name}”为对公报表，客户或账户名称按单位名称建议"
    return "person_name", "未能判断客户为个人还是单位，按较严格的个人姓名建议"


def detect_from_template(template: Template, item: TemplateField) -> list[Evidence]:
    """Return the evidence that the template's declaration of ``item`` gives, strongest first."""
    found: list[Evidence] = []
    own, conditional = _field_checks(template, item)
    if own is not None:
        kind = CHECK_KINDS[own]
        found.append(Evidence("format_check", kind, CHECK_CONFIDENCE,
                              f"模板要求该字段的每个值通过{KINDS[kind]}格式校验"))

    for rule in _NAME_RULES:
        if not (rule.name.search(item.name) or (rule.code is not None and rule.code.search(item.code))):
            continue
        kind, detail = rule.kind, f"字段“{item.code} {item.name}”的代码或名称符合{KINDS.get(rule.kind, '证件号码或名称')}的命名"
        if kind == "id_number":
            kind, detail = _resolve_id_number(template, item, conditional)
        elif kind == "party_name":
            kind, detail = _resolve_party_name(template, item)
        found.append(Evidence("name", kind, rule.confidence, detail))
        break
    else:
        if item.type in ("decimal", "integer") and _AMOUNT_NAME.search(item.name):
            found.append(Evidence("type", "amount", 0.7, f"{item.name}为数值字段，名称表明是金额"))

    for check in sorted(conditional):
        kind = CHECK_KINDS[check]
        found.append(Evidence("rule_check", kind, RULE_CHECK_CONFIDENCE,
                              f"模板对该字段的部分行（按条件）做{KINDS[kind]}格式校验"))
    return found


# --- detection from sampled values -----------------------------------------------------------------

MIN_SAMPLES = 20
"""Minimum number of non-empty samples for value evidence; with fewer, the values are not judged."""

VALUE_THRESHOLDS: dict[str, float] = {
    "resident_id": 0.9,
    "uscc": 0.9,
    "bank_card": 0.9,
    "mobile": 0.9,
    "person_name": 0.7,
    "org_name": 0.8,
    "address": 0.8,
}
"""Share of non-empty samples that must pass a detector for the values to support its kind.

Checked identifiers (resident ID, USCC, bank card) need 90%. A random digit string passes a Luhn
or ISO 7064 check digit about once in 10 or 11 tries, so 90% cannot happen by chance, while a few
mistyped values still allow a match. Mobile numbers have no check digit, but 11 digits starting
1[3-9] rarely occur by chance in other columns. Person names need only 70% because the surname
list (catalog.surnames) covers most, not all, people. Addresses and organisation names (80%) are
recognised by markers that some real values lack.
"""

_MOBILE = re.compile(r"^1[3-9][0-9]{9}$")
_CARD = re.compile(r"^[0-9]{13,19}$")
_HAN_NAME = re.compile(r"^[\u4e00-\u9fff]{2,4}$")
_ADMIN_MARKER = re.compile(r"省|自治区|市|区|县|旗|州|盟")
_STREET_MARKER = re.compile(r"街道|镇|乡|村|路|街|道|巷|弄|号|室|楼|幢|栋|组")
_ORG_MARKER = re.compile(r"公司|有限|集团|银行|厂|中心|合作社|事务所|学校|学院|医院|协会|委员会|研究院|研究所|商行|店|局|部|社")


def is_resident_id(value: str) -> bool:
    """Return whether ``value`` is 18 characters with a valid GB 11643 check digit and birth date.

    The area code (first six digits) need not be in python-stdnum's table, because the table misses
    many codes in use. A wrong check digit or an impossible birth date fails.
    """
    number = value.strip().upper()
    if len(number) != 18 or not number[:17].isdigit():
        return False
    if number[-1] != ric.calc_check_digit(number):
        return False
    try:
        ric.get_birth_date(number)
    except ValidationError:
        return False
    return True


def is_uscc(value: str) -> bool:
    """Return whether ``value`` is a 统一社会信用代码 with a valid GB 32100 check character (python-stdnum cn.uscc)."""
    return uscc.is_valid(value.strip())


def is_bank_card(value: str) -> bool:
    """Return whether ``value`` is 13 to 19 digits whose last digit is the Luhn check digit."""
    number = value.strip()
    return bool(_CARD.match(number)) and luhn.is_valid(number)


def is_mobile(value: str) -> bool:
    """Return whether ``value`` is a mainland mobile number: 11 digits, 1 then 3–9, after a +86 or 86 prefix if any."""
    number = re.sub(r"^\+?86[- ]?", "", value.strip())
    return bool(_MOBILE.match(number))


def is_person_name(value: str) -> bool:
    """Return whether ``value`` is 2 to 4 Han characters starting with a listed common surname."""
    text = value.strip().replace("·", "")
    return bool(_HAN_NAME.match(text)) and surname_of(text) is not None and not _ORG_MARKER.search(text)


def is_address(value: str) -> bool:
    """Return whether ``value`` names an administrative area (省, 市, 区, 县 ...) and a street-level place (路, 号 ...)."""
    text = value.strip()
    return len(text) >= 6 and bool(_ADMIN_MARKER.search(text)) and bool(_STREET_MARKER.search(text))


def is_org_name(value: str) -> bool:
    """Return whether ``value`` contains a marker of an organisation's name (公司, 有限, 银行, 合作社 ...)."""
    text = value.strip()
    return len(text) >= 4 and bool(_ORG_MARKER.search(text)) and not is_address(text)


VALUE_DETECTORS = {
    "resident_id": is_resident_id,
    "uscc": is_uscc,
    "bank_card": is_bank_card,
    "mobile": is_mobile,
    "person_name": is_person_name,
    "org_name": is_org_name,
    "address": is_address,
}


@dataclass(frozen=True)
class ValueReport:
    """Match counts of every value detector over the non-empty samples of one column."""

    sampled: int
    matched: Mapping[str, int]

    def share(self, kind: str) -> float:
        return self.matched.get(kind, 0) / self.sampled if self.sampled else 0.0

    def supported(self) -> list[str]:
        """Return the kinds whose share reaches their threshold, best share first, when enough values were sampled."""
        if self.sampled < MIN_SAMPLES:
            return []
        kinds = [kind for kind in VALUE_DETECTORS if self.share(kind) >= VALUE_THRESHOLDS[kind]]
        return sorted(kinds, key=lambda kind: -self.share(kind))


def scan_values(values: Iterable[str | None]) -> ValueReport:
    """Run every value detector over the non-empty ``values`` and count the matches."""
    sampled = 0
    matched = dict.fromkeys(VALUE_DETECTORS, 0)
    for value in values:
        if value is None or not str(value).strip():
            continue
        sampled += 1
        text = str(value)
        for kind, detector in VALUE_DETECTORS.items():
            if detector(text):
                matched[kind] += 1
    return ValueReport(sampled, matched)


def value_evidence(report: ValueReport) -> list[Evidence]:
    """Return the evidence of a value scan: supported kinds, or one record saying the samples matched nothing."""
    if report.sampled < MIN_SAMPLES:
        if report.sampled == 0:
            return []
        return [Evidence("values", "other", 0.0,
                         f"非空样本只有 {report.sampled} 个，少于 {MIN_SAMPLES} 个，未按样本判断", 0, report.sampled)]
    supported = report.supported()
    if not supported:
        best = max(VALUE_DETECTORS, key=report.share)
        return [Evidence("values", "other", 0.0,
                         f"样本未达到任何识别阈值（最高为{KINDS[best]} {report.share(best):.0%}）",
                         report.matched[best], report.sampled)]
    return [Evidence("values", kind, round(report.share(kind), 3),
                     f"{report.sampled} 个非空样本中 {report.matched[kind]} 个符合{KINDS[kind]}特征"
                     f"（阈值 {VALUE_THRESHOLDS[kind]:.0%}）", report.matched[kind], report.sampled)
            for kind in supported]


# --- combination -----------------------------------------------------------------------------------

AGREEMENT_BONUS = 0.05
"""Added to the confidence when the template and the values name the same kind (capped at 0.99)."""


def _stricter(kind: str) -> tuple[int, int]:
    level, category = DEFAULT_CLASSES[kind]
    return level, {"C3": 3, "C2": 2, "C1": 1, None: 0}[category]


def _score(kind: str, items: Sequence[Evidence]) -> float:
    """Return the best confidence for ``kind``, plus AGREEMENT_BONUS when two sources support it."""
    supporting = [item for item in items if item.kind == kind]
    best = max(item.confidence for item in supporting)
    if len({item.source for item in supporting}) > 1:
        best = min(0.99, best + AGREEMENT_BONUS)
    return round(best, 3)


def combine(evidence: Sequence[Evidence]) -> Proposal:
    """Choose the kind of a column from its evidence and return the proposal with its default class.

    A template ``format.check`` decides, since intake enforced it on every value. Otherwise value
    evidence that reached its threshold wins over the template, because it describes the data
    actually reported. Otherwise the kind with the best score (:func:`_score`) wins, and among equal
    scores the stricter kind (higher default level). With no evidence the kind is ``other``.
    """
    candidates = [item for item in evidence if item.kind != "other" or item.source != "values"]
    checked = [item for item in candidates if item.source == "format_check"]
    from_values = [item for item in candidates if item.source == "values"]
    pool = checked or from_values or candidates
    if not pool:
        default = Evidence("default", "other", 0.3, "字段代码、名称和样本均无可识别的特征")
        return Proposal(default_class("other"), default.confidence, (*evidence, default))

    kinds = {item.kind for item in pool}
    chosen = max(kinds, key=lambda kind: (_score(kind, candidates), _stricter(kind)))
    return Proposal(default_class(chosen), _score(chosen, candidates), tuple(evidence))


AGGREGATE_MAX_LEVEL = 2
"""Highest level proposed for a column of an aggregate report (e.g. G01), which contains no customer's details."""


def propose(template: Template, item: TemplateField, values: Iterable[str | None] | None = None) -> Proposal:
    """Propose the class of column ``item`` of ``template``, using sampled ``values`` when given.

    Columns of an aggregate template (``kind: aggregate``) hold sums over customers, so they get no
    personal-information category and at most level 2; the 金融许可证号 keeps level 1.
    """
    evidence = detect_from_template(template, item)
    if values is not None:
        evidence += value_evidence(scan_values(values))
    proposal = combine(evidence)
    if template.kind != "aggregate":
        return proposal
    chosen = proposal.column_class
    capped = ColumnClass(level=min(chosen.level, AGGREGATE_MAX_LEVEL), pi_category=None, kind=chosen.kind)
    note = Evidence("type", chosen.kind, proposal.confidence,
                    f"“{template.name}”为汇总报表，不含客户明细：不作个人金融信息，级别至多 {AGGREGATE_MAX_LEVEL} 级")
    return Proposal(capped, proposal.confidence, (*proposal.evidence, note))
