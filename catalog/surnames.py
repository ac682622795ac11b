"""Common Chinese surnames for the person-name detector.

The single-character list is the first 100 entries, in order, of the weighted surname table of
Faker 40.63's ``zh_CN`` person provider, whose source comment names the Chinese Wikipedia page
中国姓氏排名. In that table the 100 cover about 87% of the total weight. 肖 is added because
mainland registrations write it so, while the table lists the traditional-style form 萧. The
compound surnames are the common ones of the Hundred Family Surnames (百家姓) that still occur.

The list is deliberately modest: the detector needs most names of a column to match, not every
name, so a rare surname only lowers the share of matches a little.
"""

from __future__ import annotations

SINGLE_SURNAMES = frozenset(
    "王李张刘陈杨黄吴赵周徐孙马朱胡林郭何高罗郑梁谢宋唐许邓冯韩曹曾彭萧蔡潘田董袁于余叶蒋杜苏魏程吕丁沈任姚卢傅钟姜崔谭廖"
    "范汪陆金石戴贾韦夏邱方侯邹熊孟秦白江阎薛尹段雷黎史龙陶贺顾毛郝龚邵万钱严赖覃洪武莫孔"
    "肖"
)
"""Single-character surnames (101)."""

COMPOUND_SURNAMES = frozenset({"欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "令狐", "夏侯", "长孙"})
"""Two-character surnames."""


def surname_of(name: str) -> str | None:
    """Return the listed surname that ``name`` starts with, trying compound surnames first, or None."""
    if name[:2] in COMPOUND_SURNAMES:
        return name[:2]
    if name[:1] in SINGLE_SURNAMES:
        return name[:1]
    return None
