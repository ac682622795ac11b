"""k-anonymity of masked extracts: the report in the signed manifest, the refusal below k and the override."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from extracts.builder import build_institution, extract_dir
from extracts.demo_data import DEMO_INSTITUTIONS
from extracts.kanon import KAnonymityBelowError, KOverride, KOverrideInvalid, QuasiIdentifierMissing
from extracts.policy import DEFAULT_POLICY_FILE, approve_policy
from extracts.publish import builds_dir
from extracts.warehouse import read_partition
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import verify_file
from tests.extracts.test_masked_intake import CLASSES, CUSTOMERS, LOANS, warehouse  # noqa: F401 - fixture

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_QUASI_IDENTIFIERS = ["age_in_years", "personal_status_and_sex"]
SMALLEST_DEMO_CLASS = {"bank_a": 6, "bank_b": 8, "bank_c": 7}
"""Smallest class of each demo extract over age (split at 35) and personal_status_and_sex."""


def _manifest(settings: Settings, code: str) -> dict:
    return json.loads((extract_dir(settings, code) / "manifest.json").read_text("utf-8"))


def _builds(settings: Settings, code: str) -> list[str]:
    return sorted(path.name for path in builds_dir(settings, code).iterdir())


def _with_k(settings: Settings, k: int) -> Settings:
    return Settings(data_dir=settings.data_dir, extract_k_anonymity=k)


def _expected_classes(settings: Settings, code: str) -> pl.DataFrame:
    """Count the classes of the raw demo rows in polars, as an independent check of the report."""
    raw = read_partition(settings, open_keystore(settings), code)
    bands = pl.when(pl.col("age_in_years") < 35).then(pl.lit("young")).otherwise(pl.lit("old"))
    return raw.with_columns(bands.alias("age_band")).group_by("age_band", "personal_status_and_sex").len()


def _policy_with(settings: Settings, quasi_identifiers: dict, version: int, tmp_path: Path):
    document = yaml.safe_load(DEFAULT_POLICY_FILE.read_text("utf-8"))
    document = copy.deepcopy(document)
    document["version"] = version
    document["quasi_identifiers"] = quasi_identifiers
    path = tmp_path / f"policy-v{version}.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return approve_policy(settings, open_keystore(settings), path)


# --- the demo extracts under the default policy ---------------------------------------------------


@pytest.mark.parametrize("code", DEMO_INSTITUTIONS)
def test_demo_report_matches_raw_classes(demo_settings: Settings, code: str) -> None:
    section = _manifest(demo_settings, code)["k_anonymity"]
    expected = _expected_classes(demo_settings, code)

    assert section["k"] == 5
    assert section["passed"] is True
    assert section["override"] is None
    (report,) = section["tables"]
    assert report["table"] == "applications"
    assert report["assessed"] is True
    assert report["quasi_identifiers"] == DEMO_QUASI_IDENTIFIERS
    assert report["rows"] == expected["len"].sum()
    assert report["classes"] == expected.height
    assert report["min_class_size"] == expected["len"].min() == SMALLEST_DEMO_CLASS[code]
    assert (report["classes_below_k"], report["records_below_k"], report["share_below_k"]) == (0, 0, 0.0)


def test_demo_report_is_signed(demo_settings: Settings) -> None:
    folder = extract_dir(demo_settings, "bank_a")
    assert verify_file(folder / "manifest.json", open_keystore(demo_settings)).kind == "extract_manifest"
    table = _manifest(demo_settings, "bank_a")["tables"][0]
    assert table["sm3"] == _manifest(demo_settings, "bank_a")["k_anonymity"]["tables"][0]["sm3"]


def test_demo_age_generalised(demo_settings: Settings) -> None:
    frame = pl.read_parquet(extract_dir(demo_settings, "bank_b") / "applications.parquet")
    assert set(frame["age_in_years"].to_list()) == {"35 岁以下", "35 岁及以上"}
    columns = {column["name"]: column for column in _manifest(demo_settings, "bank_b")["tables"][0]["columns"]}
    assert columns["age_in_years"]["treatment"] == "generalise"
    assert columns["age_in_years"]["rule"] == "quasi_identifiers"
    assert columns["age_in_years"]["generalisation"] == {"bands": ["35 岁以下", "35 岁及以上"]}
    # Declared without a generalisation, so the class rule's keep applies.
    assert columns["personal_status_and_sex"]["treatment"] == "keep"
    assert "generalisation" not in columns["personal_status_and_sex"]


# --- refusal and override -------------------------------------------------------------------------


def test_below_k_publishes_nothing(fresh_settings: Settings) -> None:
    first = build_institution(fresh_settings, "bank_a")
    strict = _with_k(fresh_settings, 7)

    with pytest.raises(KAnonymityBelowError) as caught:
        build_institution(strict, "bank_a")

    error = caught.value
    assert error.code == "EXTRACT_K_ANONYMITY_BELOW"
    assert error.status == 409
    for part in ("bank_a", "applications", "age_in_years、personal_status_and_sex", "最小等价类 6 条", "k = 7",
                 "quasi_identifiers", "安全管理员"):
        assert part in error.message, part
    assert os.path.realpath(extract_dir(fresh_settings, "bank_a")) == str(first.folder)
    assert _builds(fresh_settings, "bank_a") == [first.build_id]


def test_override_publishes_and_records(fresh_settings: Settings) -> None:
    strict = _with_k(fresh_settings, 7)
    override = KOverride(actor="security_admin", reason="  监管现场检查急需，已报分管领导同意  ")

    outcome = build_institution(strict, "bank_a", k_override=override)

    assert outcome.status == "published"
    section = _manifest(fresh_settings, "bank_a")["k_anonymity"]
    assert section["k"] == 7
    assert section["passed"] is False
    assert section["override"]["actor"] == "security_admin"
    assert section["override"]["reason"] == "监管现场检查急需，已报分管领导同意"
    assert section["override"]["tables"] == ["applications"]
    assert section["tables"][0]["classes_below_k"] == 1
    assert section["tables"][0]["records_below_k"] == 6
    assert section["tables"][0]["share_below_k"] == round(6 / 334, 6)
    assert verify_file(extract_dir(fresh_settings, "bank_a") / "manifest.json", open_keystore(fresh_settings))
    detail = outcome.audit_detail()
    assert detail["k_anonymity"]["override"]["actor"] == "security_admin"
    assert detail["k_anonymity"]["passed"] is False


def test_override_not_needed_not_recorded(fresh_settings: Settings) -> None:
    outcome = build_institution(fresh_settings, "bank_c", k_override=KOverride("security_admin", "预防性强制发布"))
    assert outcome.k_anonymity["passed"] is True
    assert outcome.k_anonymity["override"] is None
    assert _manifest(fresh_settings, "bank_c")["k_anonymity"]["override"] is None


@pytest.mark.parametrize(
    ("actor", "reason"),
    [("security_admin", ""), ("security_admin", "   "), ("security_admin", "理" * 501), ("", "原因"),
     ("  ", "原因"), ("a" * 65, "原因"), ("security_admin", None)],
)
def test_override_needs_actor_and_reason(actor, reason) -> None:
    with pytest.raises(KOverrideInvalid) as caught:
        KOverride(actor=actor, reason=reason)
    assert caught.value.code == "EXTRACT_K_OVERRIDE_INVALID"


def test_changed_k_reassesses_unchanged_tables(fresh_settings: Settings) -> None:
    first = build_institution(fresh_settings, "bank_a")
    same = build_institution(fresh_settings, "bank_a")
    assert same.status == "unchanged"
    assert same.k_anonymity == first.k_anonymity

    # bank_a's smallest class has 6 records: k = 6 passes, and the new k is recorded in a new build.
    raised = build_institution(_with_k(fresh_settings, 6), "bank_a")
    assert raised.status == "published"
    assert raised.build_id != first.build_id
    assert not any(table.rebuilt for table in raised.tables)
    assert _manifest(fresh_settings, "bank_a")["k_anonymity"]["k"] == 6


def test_k_of_one_turns_check_off(fresh_settings: Settings) -> None:
    outcome = build_institution(_with_k(fresh_settings, 1), "bank_b")
    assert outcome.k_anonymity["passed"] is True
    assert outcome.k_anonymity["tables"][0]["min_class_size"] == SMALLEST_DEMO_CLASS["bank_b"]


# --- intake tables and policies that declare their quasi-identifiers ------------------------------


def test_intake_table_without_declaration_not_assessed(warehouse) -> None:  # noqa: F811
    settings, _store, _raw = warehouse
    outcome = build_institution(settings, "bank_a", classes=CLASSES)
    reports = {report["table"]: report for report in outcome.k_anonymity["tables"]}
    assert outcome.k_anonymity["passed"] is True
    assert reports["test_khxx"]["assessed"] is False
    assert reports["test_khxx"]["quasi_identifiers"] == []
    assert reports["test_khxx"]["min_class_size"] is None
    assert reports["test_khxx"]["rows"] == 6


def test_intake_quasi_identifiers(warehouse, tmp_path: Path) -> None:  # noqa: F811
    settings, _store, _raw = warehouse
    declared = {
        # Birth year and city differ for every customer, the name is masked by its own rule and
        # the password column is dropped.
        CUSTOMERS: [{"column": "CSRQ"}, {"column": "DZ"}, {"column": "KHMC", "prefix": 1}, {"column": "JYMM"}],
        LOANS: [{"column": "CJRQ", "prefix": 4},
                {"column": "YE", "bands": [{"below": 10000, "label": "万元以下"}, {"label": "万元及以上"}]}],
    }
    policy = _policy_with(settings, declared, 2, tmp_path)

    with pytest.raises(KAnonymityBelowError) as caught:
        build_institution(settings, "bank_a", classes=CLASSES, policy=policy)
    assert "test_khxx（准标识符 CSRQ、DZ、KHMC）最小等价类 1 条，6/6 条记录（100.0%）" in caught.value.message
    assert "test_dkxx" not in caught.value.message
    assert not extract_dir(settings, "bank_a").exists()
    assert not builds_dir(settings, "bank_a").exists() or _builds(settings, "bank_a") == []

    outcome = build_institution(settings, "bank_a", classes=CLASSES, policy=policy,
                                k_override=KOverride("security_admin", "测试用强制发布"))
    reports = {report["table"]: report for report in outcome.k_anonymity["tables"]}
    assert reports["test_khxx"]["quasi_identifiers"] == ["CSRQ", "DZ", "KHMC"]
    assert reports["test_khxx"]["dropped_quasi_identifiers"] == ["JYMM"]
    assert (reports["test_khxx"]["classes"], reports["test_khxx"]["min_class_size"]) == (6, 1)
    assert (reports["test_dkxx"]["classes"], reports["test_dkxx"]["min_class_size"]) == (1, 6)

    loans = pl.read_parquet(extract_dir(settings, "bank_a") / "test_dkxx.parquet")
    assert set(loans["CJRQ"].to_list()) == {"2025"}
    assert set(loans["YE"].to_list()) == {"万元以下"}
    table = next(item for item in _manifest(settings, "bank_a")["tables"] if item["name"] == "test_dkxx")
    columns = {column["name"]: column for column in table["columns"]}
    assert columns["CJRQ"]["generalisation"] == {"prefix": 4}
    assert columns["YE"]["treatment"] == "generalise"
    # A declared column whose class rule does not keep it is treated by that rule.
    table = next(item for item in _manifest(settings, "bank_a")["tables"] if item["name"] == "test_khxx")
    name = next(column for column in table["columns"] if column["name"] == "KHMC")
    assert (name["rule"], name["treatment"]) == ("mask-person-name", "partial_mask")
    assert "generalisation" not in name


def test_declared_column_missing_from_table(warehouse, tmp_path: Path) -> None:  # noqa: F811
    settings, _store, _raw = warehouse
    first = build_institution(settings, "bank_b", classes=CLASSES)
    policy = _policy_with(settings, {LOANS: [{"column": "HTH"}, {"column": "DKLX"}]}, 2, tmp_path)

    with pytest.raises(QuasiIdentifierMissing) as caught:
        build_institution(settings, "bank_b", classes=CLASSES, policy=policy)

    assert caught.value.code == "EXTRACT_QUASI_IDENTIFIER_MISSING"
    assert f"{LOANS} 的 DKLX" in caught.value.message
    assert "HTH" not in caught.value.message
    assert os.path.realpath(extract_dir(settings, "bank_b")) == str(first.folder)
    assert _builds(settings, "bank_b") == [first.build_id]


# --- the operator command -------------------------------------------------------------------------


def _run_cli(settings: Settings, *arguments: str, k: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("REGSANDBOX_")}
    environment.update(REGSANDBOX_DATA_DIR=str(settings.data_dir), REGSANDBOX_EXTRACT_K_ANONYMITY=k)
    return subprocess.run([sys.executable, "-m", "extracts", *arguments], cwd=PROJECT_ROOT, env=environment,
                          capture_output=True, text=True, timeout=180)


def test_cli_reports_refusal(fresh_settings: Settings) -> None:
    result = _run_cli(fresh_settings, "build", "--institution", "bank_c", k="8")
    assert result.returncode == 1
    assert "EXTRACT_K_ANONYMITY_BELOW" in result.stderr
    assert "最小等价类 7 条" in result.stderr
    assert "Traceback" not in result.stderr
    assert not extract_dir(fresh_settings, "bank_c").exists()


def test_cli_prints_smallest_class(fresh_settings: Settings) -> None:
    result = _run_cli(fresh_settings, "build", "--institution", "bank_b", k="5")
    assert result.returncode == 0, result.stderr
    assert "k 匿名（k = 5）：applications 最小等价类 8 条" in result.stdout


def test_cli_invalid_k_setting(fresh_settings: Settings) -> None:
    result = _run_cli(fresh_settings, "build", k="0")
    assert result.returncode == 2
    assert "REGSANDBOX_EXTRACT_K_ANONYMITY" in result.stderr
    assert "Traceback" not in result.stderr
