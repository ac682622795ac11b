"""Report templates: the shipped templates, catalog lookups, load-time checks and digests."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from intake.reader import FileLayout
from intake.template_model import (
    AUTO_RULE_PREFIX,
    CompareRule,
    FluctuationRule,
    FormatRule,
    ReconcileRule,
    ReferenceRule,
    TemplateCatalog,
    TemplateError,
    UniqueRule,
    load_catalog,
)

CHINESE = re.compile(r"[\u4e00-\u9fff]")

SHIPPED_CODES = {
    "EAST_DGKHXXB",
    "EAST_XDHTB",
    "EAST_DGXDYWJJB",
    "EAST_STZFXXB",
    "EAST_DGXDFHZMXJL",
    "EAST_DKWJXTBDB",
    "EAST_DBHTB",
    "EAST_DGCKFHZMXJL",
    "G01",
}

SHARED_CODE_LISTS: dict[str, Any] = {
    "code_lists": {
        "币种": {"codes": {"CNY": "人民币", "USD": "美元"}},
        "贷款状态": {"codes": {"01": "正常", "04": "结清"}},
        "未使用": {"codes": {"A": "甲"}},
    }
}


def contract_template() -> dict[str, Any]:
    return {
        "code": "T_HT",
        "name": "测试合同表",
        "version": 1,
        "standard": "EAST 5.0",
        "kind": "detail",
        "frequency": "monthly",
        "fields": [
            {"code": "JRXKZH", "name": "金融许可证号", "type": "text", "length": 30, "required": True,
             "institution": True},
            {"code": "HTH", "name": "合同号", "type": "text", "length": 60, "required": True},
            {"code": "CJRQ", "name": "采集日期", "type": "date", "required": True, "period": True},
        ],
        "primary_key": ["JRXKZH", "HTH"],
    }


def loan_template() -> dict[str, Any]:
    return {
        "code": "T_JJ",
        "name": "测试借据表",
        "version": 1,
        "standard": "EAST 5.0",
        "kind": "detail",
        "frequency": "monthly",
        "fields": [
            {"code": "JRXKZH", "name": "金融许可证号", "type": "text", "length": 30, "required": True,
             "institution": True},
            {"code": "JJH", "name": "借据号", "type": "text", "length": 60, "required": True},
            {"code": "HTH", "name": "合同号", "type": "text", "length": 60, "required": True},
            {"code": "BZ", "name": "币种", "type": "code", "length": 3, "required": True, "code_list": "币种"},
            {"code": "DKZT", "name": "贷款状态", "type": "code", "length": 2, "required": True,
             "code_list": "贷款状态"},
            {"code": "JJJE", "name": "借据金额", "type": "decimal", "precision": 20, "scale": 2, "required": True},
            {"code": "JJYE", "name": "借据余额", "type": "decimal", "precision": 20, "scale": 2, "required": True},
            {"code": "DKFFRQ", "name": "贷款发放日期", "type": "date", "required": True},
            {"code": "DKDQRQ", "name": "贷款到期日期", "type": "date", "required": True},
            {"code": "CJRQ", "name": "采集日期", "type": "date", "required": True, "period": True},
            {"code": "BEIZ", "name": "备注", "type": "text", "length": 500, "remark": True},
        ],
        "primary_key": ["JRXKZH", "JJH"],
        "rules": [
            {"id": "R-T-001", "name": "到期日期不早于发放日期", "severity": "error", "kind": "compare",
             "left": "DKDQRQ", "op": ">=", "right": {"field": "DKFFRQ"}},
            {"id": "R-T-002", "name": "余额不大于金额", "severity": "warning", "kind": "compare",
             "left": "JJYE", "op": "<=", "right": {"field": "JJJE"}},
            {"id": "R-T-003", "name": "合同须存在", "severity": "error", "kind": "reference",
             "fields": ["JRXKZH", "HTH"], "target": {"template": "T_HT", "fields": ["JRXKZH", "HTH"]}},
        ],
    }


def write_yaml(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def write_catalog(folder: Path, loan: dict[str, Any] | None = None, *, shared: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "code_lists.yaml", shared if shared is not None else SHARED_CODE_LISTS)
    write_yaml(folder / "T_HT.v1.yaml", contract_template())
    write_yaml(folder / "T_JJ.v1.yaml", loan if loan is not None else loan_template())
    return folder


def load_error(folder: Path) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        load_catalog(folder)
    return caught.value


def field_entry(template: dict[str, Any], code: str) -> dict[str, Any]:
    return next(item for item in template["fields"] if item["code"] == code)


def rule_entry(template: dict[str, Any], rule_id: str) -> dict[str, Any]:
    return next(item for item in template["rules"] if item["id"] == rule_id)


# --- shipped templates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> TemplateCatalog:
    return load_catalog()


def test_shipped_templates_all_load(shipped: TemplateCatalog) -> None:
    assert {template.code for template in shipped.all()} == SHIPPED_CODES
    for template in shipped.all():
        assert re.fullmatch(r"[0-9a-f]{64}", template.digest), template.code
        assert template.source_path is not None
        assert template.source_path.name == f"{template.code}.v{template.version}.yaml"
        assert CHINESE.search(template.name), template.code
        if template.kind == "detail":
            assert template.period_field is not None, template.code
            assert template.period_field.code == "CJRQ", template.code
            assert template.institution_field is not None, template.code
            assert template.institution_field.code == "JRXKZH", template.code
            assert template.remark_field is not None, template.code


def test_shipped_templates_use_both_severities(shipped: TemplateCatalog) -> None:
    for template in shipped.all():
        severities = {rule.severity for rule in template.rules}
        assert severities == {"error", "warning"}, template.code


def test_loan_receipt_table_shape(shipped: TemplateCatalog) -> None:
    loans = shipped.get("EAST_DGXDYWJJB")
    assert loans.name == "对公信贷业务借据表"
    assert loans.standard == "EAST 5.0"
    assert len(loans.fields) == 30
    names = {item.name for item in loans.fields}
    for name in ("金融许可证号", "内部机构号", "客户统一编号", "借据号", "合同号", "贷款发放日期", "贷款到期日期",
                 "借据金额", "借据余额", "币种", "五级分类", "贷款状态", "受托支付标识", "采集日期", "备注"):
        assert name in names
    amount = loans.field("JJYE")
    assert (amount.type, amount.precision, amount.scale) == ("decimal", 20, 2)
    rate = loans.field("SJLL")
    assert (rate.type, rate.precision, rate.scale) == ("decimal", 20, 6)
    assert loans.field("DBFS").multi
    assert loans.allowed_codes("WJFL") == {"01": "正常", "02": "关注", "03": "次级", "04": "可疑", "05": "损失"}
    assert loans.allowed_codes("STZFBS") == {"Y": "是", "N": "否"}


def test_loan_receipt_table_has_every_rule_kind(shipped: TemplateCatalog) -> None:
    loans = shipped.get("EAST_DGXDYWJJB")
    kinds = {rule.kind for rule in loans.rules}
    assert kinds == {"not_null", "unique", "code_list", "format", "compare", "reference", "reconcile", "fluctuation"}

    unique_scopes = {rule.scope for rule in loans.rules if isinstance(rule, UniqueRule)}
    assert unique_scopes == {"file", "history"}
    assert any(isinstance(rule, FormatRule) and rule.check == "uscc" for rule in loans.rules)

    comparisons = {(rule.left, rule.op, rule.right.field) for rule in loans.rules
                   if isinstance(rule, CompareRule) and rule.right is not None}
    assert ("DKDQRQ", ">=", "DKFFRQ") in comparisons
    assert ("JJYE", "<=", "JJJE") in comparisons

    targets = {rule.target.template for rule in loans.rules if isinstance(rule, ReferenceRule)}
    assert targets == {"EAST_XDHTB", "EAST_DGKHXXB"}

    reconcile = next(rule for rule in loans.rules if isinstance(rule, ReconcileRule))
    assert reconcile.left.field == "JJYE"
    assert reconcile.right.template == "G01"
    assert reconcile.right.line in {line.code for line in shipped.get("G01").lines}
    assert reconcile.tolerance is not None

    fluctuation = next(rule for rule in loans.rules if isinstance(rule, FluctuationRule))
    assert fluctuation.measure.field == "JJYE"
    assert fluctuation.baseline == "previous_period"


def test_derived_rules_fill_gaps_only(shipped: TemplateCatalog) -> None:
    loans = shipped.get("EAST_DGXDYWJJB")
    ids = [rule.id for rule in loans.effective_rules()]
    assert len(ids) == len(set(ids))
    assert ids[: len(loans.rules)] == [rule.id for rule in loans.rules]
    # R-JJ-001 covers 借据号 and R-JJ-005 covers 币种, so no derived rule repeats them.
    assert f"{AUTO_RULE_PREFIX}NOTNULL-JJH" not in ids
    assert f"{AUTO_RULE_PREFIX}CODELIST-BZ" not in ids
    assert f"{AUTO_RULE_PREFIX}NOTNULL-YHJGMC" in ids
    assert f"{AUTO_RULE_PREFIX}CODELIST-XDYWZL" in ids
    assert f"{AUTO_RULE_PREFIX}FORMAT-SJLL" in ids
    # R-JJ-003 covers the primary key. R-JJ-006 has a condition, so 证件号码 keeps its own format rule.
    assert f"{AUTO_RULE_PREFIX}UNIQUE-PK" not in ids
    assert f"{AUTO_RULE_PREFIX}FORMAT-ZJHM" in ids

    report = shipped.get("G01")
    assert f"{AUTO_RULE_PREFIX}CODELIST-XMDM" in [rule.id for rule in report.effective_rules()]
    assert report.allowed_codes("XMDM")["7.1"] == "其中：对公贷款"


def test_file_layout_for_reader(shipped: TemplateCatalog) -> None:
    loans = shipped.get("EAST_DGXDYWJJB")
    layout = loans.file_layout()
    assert isinstance(layout, FileLayout)
    assert layout.columns == tuple(item.code for item in loans.fields)
    assert layout.column_names[:2] == ("金融许可证号", "内部机构号")
    assert "JJYE" in layout.normalised
    assert "DKFFRQ" in layout.normalised
    assert "BZ" in layout.normalised
    assert "YQTS" in layout.normalised
    assert "KHMC" not in layout.normalised
    assert "BEIZ" not in layout.normalised
    assert (layout.delimiter, layout.header, layout.trailing_delimiter) == ("|", True, "allowed")

    report_layout = shipped.get("G01").file_layout()
    assert (report_layout.delimiter, report_layout.trailing_delimiter) == (",", "forbidden")


# --- catalog lookups ---------------------------------------------------------------------------------


def test_catalog_get_newest_and_exact_version(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    newer = loan_template()
    newer["version"] = 2
    newer["name"] = "测试借据表（第二版）"
    write_yaml(folder / "T_JJ.v2.yaml", newer)

    catalog = load_catalog(folder)

    assert catalog.get("T_JJ").version == 2
    assert catalog.get("T_JJ", 1).name == "测试借据表"
    assert catalog.get("T_JJ", 2).name == "测试借据表（第二版）"
    assert catalog.versions("T_JJ") == (1, 2)
    assert [(item.code, item.version) for item in catalog.all()] == [("T_HT", 1), ("T_JJ", 1), ("T_JJ", 2)]
    assert len(catalog) == 3
    assert "T_JJ" in catalog


def test_catalog_unknown_code_lists_known(shipped: TemplateCatalog) -> None:
    with pytest.raises(TemplateError) as caught:
        shipped.get("EAST_NO_SUCH_TABLE")
    error = caught.value
    assert error.code == "TEMPLATE_NOT_FOUND"
    assert error.status == 404
    assert "EAST_NO_SUCH_TABLE" in error.message
    assert "EAST_DGXDYWJJB（对公信贷业务借据表）" in error.message
    assert "G01" in error.message
    assert CHINESE.search(error.message)


def test_catalog_unknown_version(shipped: TemplateCatalog) -> None:
    with pytest.raises(TemplateError) as caught:
        shipped.get("EAST_DGXDYWJJB", 99)
    assert caught.value.code == "TEMPLATE_NOT_FOUND"
    assert "第 99 版" in caught.value.message
    assert "已有版本：1" in caught.value.message


def test_catalog_load_classmethod(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    assert TemplateCatalog.load(folder).get("T_HT").code == "T_HT"


# --- invalid templates ---------------------------------------------------------------------------------


def unknown_field_in_rule(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-001")["left"] = "DKDQRQX"


def duplicate_rule_id(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-002")["id"] = "R-T-001"


def missing_period(loan: dict[str, Any]) -> None:
    del field_entry(loan, "CJRQ")["period"]


def two_periods(loan: dict[str, Any]) -> None:
    field_entry(loan, "DKFFRQ")["period"] = True


def bad_severity(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-001")["severity"] = "fatal"


def bad_regex(loan: dict[str, Any]) -> None:
    field_entry(loan, "JJH")["format"] = {"pattern": "^[0-9{4,20}$"}


def lookahead_regex(loan: dict[str, Any]) -> None:
    """Python's ``re`` accepts a lookahead; DuckDB's RE2, which runs the validation, does not."""
    field_entry(loan, "JJH")["format"] = {"pattern": "(?=JJ)[A-Z0-9]{4,20}"}


def date_compared_with_amount(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-001")["right"] = {"field": "JJJE"}


def ordering_on_code_field(loan: dict[str, Any]) -> None:
    loan["rules"].append({"id": "R-T-009", "name": "状态大于", "severity": "error", "kind": "compare",
                          "left": "DKZT", "op": ">", "right": {"value": "01"}})


def amount_compared_with_string(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-002")["right"] = {"value": "100"}


def constant_not_in_code_list(loan: dict[str, Any]) -> None:
    loan["rules"].append({"id": "R-T-009", "name": "结清贷款余额为 0", "severity": "error", "kind": "compare",
                          "left": "JJYE", "op": "=", "right": {"value": 0},
                          "when": {"field": "DKZT", "op": "=", "right": {"value": "99"}}})


def unquoted_code_constant(loan: dict[str, Any]) -> None:
    loan["rules"].append({"id": "R-T-009", "name": "状态", "severity": "error", "kind": "compare",
                          "left": "DKZT", "op": "in", "values": [1, 4]})


def unknown_code_list(loan: dict[str, Any]) -> None:
    field_entry(loan, "DKZT")["code_list"] = "贷款形态"


def unknown_key(loan: dict[str, Any]) -> None:
    field_entry(loan, "JJH")["lenght"] = 60


def unknown_rule_kind(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-001")["kind"] = "range"


def decimal_without_precision(loan: dict[str, Any]) -> None:
    del field_entry(loan, "JJJE")["precision"]


def primary_key_not_required(loan: dict[str, Any]) -> None:
    del field_entry(loan, "JJH")["required"]


def primary_key_unknown_field(loan: dict[str, Any]) -> None:
    loan["primary_key"] = ["JRXKZH", "JJHAO"]


def check_longer_than_field(loan: dict[str, Any]) -> None:
    field_entry(loan, "JJH")["format"] = {"check": "uscc"}
    field_entry(loan, "JJH")["length"] = 10


def operand_with_two_sides(loan: dict[str, Any]) -> None:
    rule_entry(loan, "R-T-001")["right"] = {"field": "DKFFRQ", "value": "20240101"}


def multi_field_in_compare(loan: dict[str, Any]) -> None:
    field_entry(loan, "HTH")["multi"] = True
    loan["rules"].append({"id": "R-T-009", "name": "合同号", "severity": "error", "kind": "compare",
                          "left": "HTH", "op": "=", "right": {"field": "JJH"}})


def aggregate_of_text_field(loan: dict[str, Any]) -> None:
    loan["rules"].append({"id": "R-T-009", "name": "波动", "severity": "warning", "kind": "fluctuation",
                          "measure": {"function": "sum", "field": "HTH"}, "threshold": 0.2})


INVALID_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, tuple[str, ...]]] = [
    ("unknown field in rule", unknown_field_in_rule, "TEMPLATE_FIELD_UNKNOWN", ("R-T-001", "DKDQRQX", "DKDQRQ？")),
    ("duplicate rule id", duplicate_rule_id, "TEMPLATE_RULE_DUPLICATE", ("R-T-001", "重复")),
    ("missing period field", missing_period, "TEMPLATE_PERIOD_FIELD", ("period: true", "采集日期")),
    ("two period fields", two_periods, "TEMPLATE_PERIOD_FIELD", ("DKFFRQ、CJRQ",)),
    ("bad severity", bad_severity, "TEMPLATE_INVALID", ("R-T-001", "severity", "'fatal'", "'error'、'warning'", "错误")),
    ("bad regex", bad_regex, "TEMPLATE_REGEX_INVALID", ("JJH", "正则表达式")),
    ("regex RE2 rejects", lookahead_regex, "TEMPLATE_REGEX_INVALID", ("JJH", "RE2", "(?=", "前后查找")),
    ("date compared with amount", date_compared_with_amount, "TEMPLATE_TYPE_MISMATCH",
     ("R-T-001", "日期字段 DKDQRQ", "数值字段 JJJE")),
    ("ordering on code field", ordering_on_code_field, "TEMPLATE_TYPE_MISMATCH", ("DKZT", ">")),
    ("amount compared with string", amount_compared_with_string, "TEMPLATE_TYPE_MISMATCH", ("JJYE", "'100'")),
    ("constant not in code list", constant_not_in_code_list, "TEMPLATE_CODE_LIST_MISMATCH", ("'99'", "DKZT")),
    ("unquoted code constant", unquoted_code_constant, "TEMPLATE_TYPE_MISMATCH", ("DKZT", "加引号")),
    ("unknown code list", unknown_code_list, "TEMPLATE_CODE_LIST_UNKNOWN", ("贷款形态", "code_lists.yaml")),
    ("unknown key", unknown_key, "TEMPLATE_INVALID", ("lenght", "拼写")),
    ("unknown rule kind", unknown_rule_kind, "TEMPLATE_INVALID", ("'range'", "not_null")),
    ("decimal without precision", decimal_without_precision, "TEMPLATE_INVALID", ("JJJE", "precision")),
    ("primary key not required", primary_key_not_required, "TEMPLATE_INVALID", ("主键字段 JJH", "required")),
    ("primary key unknown field", primary_key_unknown_field, "TEMPLATE_FIELD_UNKNOWN", ("primary_key", "JJHAO")),
    ("check longer than field", check_longer_than_field, "TEMPLATE_INVALID", ("JJH", "uscc", "18")),
    ("operand with two sides", operand_with_two_sides, "TEMPLATE_INVALID", ("R-T-001", "right", "只能写")),
    ("multi field in compare", multi_field_in_compare, "TEMPLATE_TYPE_MISMATCH", ("R-T-009", "多值字段 HTH")),
    ("aggregate of text field", aggregate_of_text_field, "TEMPLATE_TYPE_MISMATCH", ("R-T-009", "HTH", "求和")),
]


@pytest.mark.parametrize(
    ("mutate", "code", "fragments"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_template_rejected(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], code: str, fragments: tuple[str, ...]
) -> None:
    loan = loan_template()
    mutate(loan)
    folder = write_catalog(tmp_path / "templates", loan)

    error = load_error(folder)

    assert error.code == code, error.message
    assert "T_JJ.v1.yaml" in error.message
    assert CHINESE.search(error.message)
    for fragment in fragments:
        assert fragment in error.message


def test_reference_to_unknown_template(tmp_path: Path) -> None:
    loan = loan_template()
    rule_entry(loan, "R-T-003")["target"]["template"] = "T_NO_SUCH"
    error = load_error(write_catalog(tmp_path / "templates", loan))
    assert error.code == "TEMPLATE_REFERENCE_UNKNOWN"
    assert "T_JJ.v1.yaml" in error.message
    assert "R-T-003" in error.message
    assert "T_NO_SUCH" in error.message
    assert "T_HT" in error.message


def test_reference_to_unknown_target_field(tmp_path: Path) -> None:
    loan = loan_template()
    rule_entry(loan, "R-T-003")["target"]["fields"] = ["JRXKZH", "HTBH"]
    error = load_error(write_catalog(tmp_path / "templates", loan))
    assert error.code == "TEMPLATE_FIELD_UNKNOWN"
    assert "HTBH" in error.message
    assert "T_HT" in error.message


def test_reference_field_count_mismatch(tmp_path: Path) -> None:
    loan = loan_template()
    rule_entry(loan, "R-T-003")["target"]["fields"] = ["HTH"]
    error = load_error(write_catalog(tmp_path / "templates", loan))
    assert error.code == "TEMPLATE_REFERENCE_INVALID"
    assert "一一对应" in error.message


def test_reconcile_to_unknown_line(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    for name in ("code_lists.yaml", "G01.v1.yaml"):
        (folder / name).write_bytes((Path(load_catalog().get("G01").source_path).parent / name).read_bytes())
    loan = loan_template()
    loan["rules"].append({"id": "R-T-009", "name": "核对", "severity": "warning", "kind": "reconcile",
                          "left": {"function": "sum", "field": "JJYE"},
                          "right": {"template": "G01", "line": "99", "column": "RMB", "factor": 10000},
                          "tolerance": {"absolute": 10000}})
    write_yaml(folder / "T_HT.v1.yaml", contract_template())
    write_yaml(folder / "T_JJ.v1.yaml", loan)
    error = load_error(folder)
    assert error.code == "TEMPLATE_REFERENCE_INVALID"
    assert "'99'" in error.message
    assert "7.1 其中：对公贷款" in error.message


def test_bad_yaml_syntax(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    (folder / "T_BAD.v1.yaml").write_text("code: T_BAD\nname: 坏模板\nfields:\n  - {code: A, name: 甲\n", encoding="utf-8")
    error = load_error(folder)
    assert error.code == "TEMPLATE_YAML_INVALID"
    assert "T_BAD.v1.yaml" in error.message
    assert "第 5 行" in error.message
    assert CHINESE.search(error.message)


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    text = (folder / "T_HT.v1.yaml").read_text(encoding="utf-8")
    (folder / "T_HT.v1.yaml").write_text(text + "version: 2\n", encoding="utf-8")
    error = load_error(folder)
    assert error.code == "TEMPLATE_YAML_INVALID"
    assert "version" in error.message
    assert "重复" in error.message


def test_duplicate_code_and_version(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    write_yaml(folder / "T_JJ.copy.yaml", loan_template())
    error = load_error(folder)
    assert error.code == "TEMPLATE_DUPLICATE"
    assert "T_JJ.copy.yaml" in error.message
    assert "T_JJ.v1.yaml" in error.message
    assert "第 1 版" in error.message


def test_unquoted_code_in_code_list(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    (folder / "code_lists.yaml").write_text("code_lists:\n  五级分类:\n    codes:\n      01: 正常\n", encoding="utf-8")
    error = load_error(folder)
    assert error.code == "TEMPLATE_INVALID"
    assert "code_lists.yaml" in error.message
    assert "五级分类" in error.message
    assert "引号" in error.message


def test_yml_extension_rejected(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "templates")
    write_yaml(folder / "T_XX.v1.yml", contract_template())
    error = load_error(folder)
    assert "T_XX.v1.yml" in error.message
    assert ".yaml" in error.message


def test_several_problems_in_one_message(tmp_path: Path) -> None:
    loan = loan_template()
    unknown_field_in_rule(loan)
    unknown_code_list(loan)
    error = load_error(write_catalog(tmp_path / "templates", loan))
    assert "2 处问题" in error.message
    assert "DKDQRQX" in error.message
    assert "贷款形态" in error.message
    assert [code for code, _ in error.problems] == ["TEMPLATE_CODE_LIST_UNKNOWN", "TEMPLATE_FIELD_UNKNOWN"]


def test_chinese_severity_accepted(tmp_path: Path) -> None:
    loan = loan_template()
    rule_entry(loan, "R-T-001")["severity"] = "错误"
    rule_entry(loan, "R-T-002")["severity"] = "提示"
    catalog = load_catalog(write_catalog(tmp_path / "templates", loan))
    severities = [rule.severity for rule in catalog.get("T_JJ").rules[:2]]
    assert severities == ["error", "warning"]


# --- digests -------------------------------------------------------------------------------------------


def digest_of(folder: Path, code: str = "T_JJ") -> str:
    return load_catalog(folder).get(code).digest


def test_digest_stable_across_loads(tmp_path: Path, shipped: TemplateCatalog) -> None:
    folder = write_catalog(tmp_path / "templates")
    assert digest_of(folder) == digest_of(folder)
    again = load_catalog()
    for template in shipped.all():
        assert again.get(template.code, template.version).digest == template.digest


def test_digest_ignores_layout_of_file(tmp_path: Path) -> None:
    first = write_catalog(tmp_path / "block")
    second = write_catalog(tmp_path / "flow")
    flow = yaml.safe_dump(loan_template(), allow_unicode=True, sort_keys=True, default_flow_style=True)
    (second / "T_JJ.v1.yaml").write_text("# 注释不影响摘要\n" + flow, encoding="utf-8")
    assert digest_of(first) == digest_of(second)


def test_digest_changes_with_content(tmp_path: Path) -> None:
    before = digest_of(write_catalog(tmp_path / "before"))

    loan = loan_template()
    rule_entry(loan, "R-T-002")["severity"] = "error"
    assert digest_of(write_catalog(tmp_path / "severity", loan)) != before

    loan = loan_template()
    field_entry(loan, "JJH")["length"] = 61
    assert digest_of(write_catalog(tmp_path / "length", loan)) != before


def test_digest_follows_used_shared_code_lists(tmp_path: Path) -> None:
    before = digest_of(write_catalog(tmp_path / "before"))

    used = copy.deepcopy(SHARED_CODE_LISTS)
    used["code_lists"]["币种"]["codes"]["EUR"] = "欧元"
    assert digest_of(write_catalog(tmp_path / "used", shared=used)) != before

    unused = copy.deepcopy(SHARED_CODE_LISTS)
    unused["code_lists"]["未使用"]["codes"]["B"] = "乙"
    assert digest_of(write_catalog(tmp_path / "unused", shared=unused)) == before
