"""Classes of a warehouse column: its data security level and personal-information category.

The two class systems are those of the financial-industry standards:

- JR/T 0197-2020 (金融数据安全 数据安全分级指南) grades data in five levels, 1 (lowest) to 5
  (highest, 重要数据 whose leak may affect national security or the public interest).
- JR/T 0171-2020 (个人金融信息保护技术规范) sorts personal financial information into C3
  (authentication data such as passwords and biometrics), C2 (identifying the person or their
  accounts, e.g. resident ID number, bank card number, mobile number) and C1 (other information
  held inside the institution, e.g. account open dates).

``kind`` is the semantic kind that a detector found or a steward confirmed. The masking policy
chooses a treatment from the level, the category and the kind, so a detector and a policy agree
on these names only.

A column that no data steward has confirmed is treated as :data:`UNCONFIRMED_LEVEL` (level 4,
masked) whatever was proposed for it: the catalog fails closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SECURITY_LEVELS: dict[int, str] = {
    1: "1级（公开）",
    2: "2级（内部）",
    3: "3级（敏感）",
    4: "4级（高度敏感）",
    5: "5级（重要数据）",
}
"""JR/T 0197-2020 data security levels with their Chinese labels as shown in the console."""

PiCategory = Literal["C1", "C2", "C3"]
PI_CATEGORIES: dict[str, str] = {
    "C1": "C1（机构内部使用的个人金融信息）",
    "C2": "C2（可识别特定个人身份与金融状况的信息）",
    "C3": "C3（用户鉴别信息）",
}
"""JR/T 0171-2020 personal financial information categories with their Chinese labels."""

KINDS: dict[str, str] = {
    "resident_id": "居民身份证号码",
    "uscc": "统一社会信用代码",
    "org_code": "组织机构代码",
    "bank_card": "银行卡号",
    "account_no": "账号",
    "mobile": "手机号码",
    "person_name": "个人姓名",
    "org_name": "单位名称",
    "address": "地址",
    "birth_date": "出生日期",
    "amount": "金额",
    "auth_secret": "鉴别信息（密码、口令、生物特征等）",
    "licence_no": "金融许可证号",
    "customer_no": "客户编号",
    "contract_no": "合同号、借据号或流水号",
    "phone": "联系电话",
    "free_text": "自由文本（备注、摘要、用途等）",
    "other": "其他",
}
"""Semantic kinds a detector may propose and a policy may name."""

CATEGORY_MIN_LEVELS: dict[str, int] = {"C1": 2, "C2": 3, "C3": 4}
"""Lowest security level a column of each personal-information category may have.

NOTE: modelled on our reading of JR/T 0197-2020, which places C3 information at level 4, C2 at
level 3 and C1 at level 2; the steward may always choose a higher level.
"""

UNCONFIRMED_LEVEL = 4
"""Level applied to a column that no data steward has confirmed yet (fail closed)."""


@dataclass(frozen=True)
class ColumnClass:
    """The classes of one column: JR/T 0197 level, JR/T 0171 category (None when not personal) and kind."""

    level: int
    pi_category: PiCategory | None = None
    kind: str = "other"

    def __post_init__(self) -> None:
        if self.level not in SECURITY_LEVELS:
            raise ValueError(f"security level must be 1..5, got {self.level!r}")
        if self.pi_category is not None and self.pi_category not in PI_CATEGORIES:
            raise ValueError(f"personal information category must be C1, C2 or C3, got {self.pi_category!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown column kind {self.kind!r}")


def effective_class(proposed: ColumnClass | None, confirmed: ColumnClass | None) -> ColumnClass:
    """Return the class that masking applies: the confirmed one, else level 4 with the proposal's category and kind.

    An unconfirmed column keeps its proposed category and kind, so it is masked the way its kind
    is masked, at level 4 at least; a column with no proposal at all is masked as level 4 ``other``.
    """
    if confirmed is not None:
        return confirmed
    if proposed is None:
        return ColumnClass(level=UNCONFIRMED_LEVEL)
    return ColumnClass(level=max(UNCONFIRMED_LEVEL, proposed.level), pi_category=proposed.pi_category,
                       kind=proposed.kind)
