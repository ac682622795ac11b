"""The masking SQL on edge values: NULL, empty text, surrounding spaces and values too short to mask."""

from __future__ import annotations

from decimal import Decimal

import duckdb
import pyarrow as pa

from catalog.classes import ColumnClass
from extracts.masking import ColumnPlan, select_sql
from extracts.policy import Band

BANDS = (Band(Decimal(10000), "[0, 1万)"), Band(Decimal(100000), "[1万, 10万)"), Band(Decimal(1000000), "[10万, 100万)"),
         Band(Decimal(10000000), "[100万, 1000万)"), Band(None, "[1000万, +∞)"))

PLANS = [
    ColumnPlan("mobile", ColumnClass(3, "C2", "mobile"), True, "partial-mask", "partial_mask"),
    ColumnPlan("name", ColumnClass(3, "C2", "person_name"), True, "partial-mask", "partial_mask"),
    ColumnPlan("birth", ColumnClass(3, "C2", "birth_date"), True, "generalise", "generalise"),
    ColumnPlan("address", ColumnClass(3, "C2", "address"), True, "generalise", "generalise"),
    ColumnPlan("amount", ColumnClass(4, None, "amount"), True, "band-amount", "generalise", BANDS),
    ColumnPlan("kept", ColumnClass(2, None, "other"), True, "keep-low-level", "keep"),
]

ROWS = [
    # mobile, name, birth, address, amount, kept
    ("13812345678", "欧阳明华", "1990-01-02", "上海市浦东新区世纪大道100号", "25000.00", " a "),
    (" 13812345678 ", " 张三", " 19851231 ", " 浙江省杭州市西湖区文三路90号 ", " 1,234,567.89 ", "b"),
    (None, None, None, None, None, None),
    ("", "", "", "", "", ""),
    ("1234567", "王", "85-01-01", "建设路1号", "not a number", "c"),
    ("12345678", "司马", "1990", "内蒙古自治区呼和浩特市新城区1号", "99999999", "d"),
]

EXPECTED = [
    ("138****5678", "欧阳**", "1990", "上海市", "[1万, 10万)", " a "),
    ("138****5678", "张*", "1985", "浙江省杭州市", "[100万, 1000万)", "b"),
    (None, None, None, None, None, None),
    ("", "", None, None, None, ""),
    ("*******", "*", None, None, None, "c"),
    ("123*5678", "**", "1990", "内蒙古自治区呼和浩特市", "[1000万, +∞)", "d"),
]


def test_masks_of_edge_values() -> None:
    columns = list(zip(*ROWS))
    table = pa.table({plan.name: pa.array(column, pa.string()) for plan, column in zip(PLANS, columns)})
    con = duckdb.connect()
    con.register("source", table)
    relation = con.sql(f"SELECT * FROM ({select_sql(PLANS, 'source')}) ORDER BY kept NULLS LAST")
    assert relation.columns == [plan.name for plan in PLANS]
    ordered = sorted(zip(EXPECTED, ROWS), key=lambda pair: (pair[1][5] is None, pair[1][5] or ""))
    assert relation.fetchall() == [expected for expected, _row in ordered]
