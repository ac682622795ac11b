"""Masking policy files: validation codes, approval with an SM2 signature, and the policy CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalog.classes import KINDS, SECURITY_LEVELS, ColumnClass, effective_class
from extracts.builder import build_extract
from extracts.demo_data import load_demo
from extracts.policy import (
    DEFAULT_POLICY_FILE,
    PolicyInvalid,
    PolicyNotApproved,
    approve_policy,
    approved_path,
    approved_versions,
    ensure_default_policy,
    load_approved_policy,
    load_policy,
)
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings
from regsandbox_core.signing import verify_file

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load(DEFAULT_POLICY_FILE.read_text("utf-8"))


def _write(tmp_path: Path, document: dict, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _variant(change) -> dict:
    document = copy.deepcopy(DEFAULT)
    change(document)
    return document


def _rule(document: dict, rule_id: str) -> dict:
    return next(rule for rule in document["rules"] if rule["id"] == rule_id)


def _invalid(tmp_path: Path, document: dict) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(_write(tmp_path, document))
    return caught.value


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    return Settings(data_dir=data_dir)


def test_default_policy_covers_every_class() -> None:
    policy = load_policy(DEFAULT_POLICY_FILE)
    assert (policy.name, policy.version) == ("默认脱敏策略", 1)
    for level in SECURITY_LEVELS:
        for category in ("C1", "C2", "C3", None):
            for kind in KINDS:
                treatment = policy.rule_for(ColumnClass(level, category, kind)).treatment
                if category == "C3" or kind == "auth_secret":
                    assert treatment == "drop", (level, category, kind)
                if level >= 4 or category == "C2":
                    assert treatment != "keep", (level, category, kind)


def test_unclassified_column_is_masked_not_kept() -> None:
    rule = load_policy(DEFAULT_POLICY_FILE).rule_for(effective_class(None, None))
    assert rule.treatment == "token"


def test_c3_kept_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: _rule(document, "drop-c3").update(treatment="keep")))
    assert error.code == "POLICY_C3_NOT_DROPPED"
    assert "drop-c3" in error.message and "C3" in error.message


def test_c3_tokenised_rejected(tmp_path: Path) -> None:
    def change(document: dict) -> None:
        _rule(document, "drop-c3")["match"] = {"pi_categories": ["C3"], "kinds": ["auth_secret"]}
        document["rules"].append({"id": "token-c3", "match": {"pi_categories": ["C3"],
                                  "kinds": [kind for kind in KINDS if kind != "auth_secret"]}, "treatment": "token"})

    error = _invalid(tmp_path, _variant(change))
    assert error.code == "POLICY_C3_NOT_DROPPED"
    assert "token-c3" in error.message


def test_treatment_not_fitting_kind_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: _rule(document, "mask-mobile")["match"].update(
        kinds=["mobile", "address"])))
    assert error.code == "POLICY_TREATMENT_KIND_MISMATCH"
    assert "address" in error.message


def test_generalise_without_kind_fit_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: _rule(document, "birth-date-year")["match"].update(
        kinds=["birth_date", "mobile"])))
    assert error.code == "POLICY_TREATMENT_KIND_MISMATCH"


def test_unknown_kind_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: _rule(document, "mask-mobile")["match"].update(
        kinds=["mobile", "passport"])))
    assert error.code == "POLICY_KIND_UNKNOWN"
    assert "passport" in error.message


def test_overlapping_rules_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: document["rules"].append(
        {"id": "extra-mobile", "match": {"kinds": ["mobile"], "pi_categories": ["C2"]}, "treatment": "token"})))
    assert error.code == "POLICY_RULE_OVERLAP"
    assert "mask-mobile" in error.message and "extra-mobile" in error.message


def test_missing_rule_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: document["rules"].remove(_rule(document, "address-city"))))
    assert error.code == "POLICY_RULE_MISSING"
    assert "address" in error.message


def test_keep_of_level_four_rejected(tmp_path: Path) -> None:
    def change(document: dict) -> None:
        _rule(document, "keep-low-level")["match"]["levels"] = [1, 2, 3, 4, 5]
        document["rules"].remove(_rule(document, "token-sensitive"))
        _rule(document, "token-c2-other")["match"]["levels"] = [1, 2, 3, 4, 5]

    error = _invalid(tmp_path, _variant(change))
    assert error.code == "POLICY_KEEP_NOT_ALLOWED"
    assert "4 级" in error.message


def test_keep_of_c2_rejected(tmp_path: Path) -> None:
    error = _invalid(tmp_path, _variant(lambda document: _rule(document, "token-c2-other").update(treatment="keep")))
    assert error.code == "POLICY_KEEP_NOT_ALLOWED"
    assert "C2" in error.message


@pytest.mark.parametrize(
    "bands",
    [
        [{"label": "全部"}],
        [{"below": 100, "label": "小"}, {"below": 50, "label": "中"}, {"label": "大"}],
        [{"below": 100, "label": "小"}, {"below": 1000, "label": "中"}],
        [{"below": "many", "label": "小"}, {"label": "大"}],
        [{"below": 100, "label": "同名"}, {"label": "同名"}],
    ],
)
def test_invalid_bands_rejected(tmp_path: Path, bands: list) -> None:
    error = _invalid(tmp_path, _variant(lambda document: _rule(document, "band-amount").update(bands=bands)))
    assert error.code == "POLICY_BANDS_INVALID"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda document: document.update(version=0), "POLICY_VERSION_INVALID"),
        (lambda document: document.update(format="other/1"), "POLICY_FORMAT_INVALID"),
        (lambda document: _rule(document, "drop-c3").update(treatment="encrypt"), "POLICY_TREATMENT_UNKNOWN"),
        (lambda document: _rule(document, "drop-c3")["match"].update(levels=[6]), "POLICY_LEVEL_UNKNOWN"),
        (lambda document: _rule(document, "drop-c3")["match"].update(pi_categories=["C4"]), "POLICY_CATEGORY_UNKNOWN"),
        (lambda document: _rule(document, "mask-mobile").update(id="drop-c3"), "POLICY_RULE_INVALID"),
    ],
)
def test_malformed_policy_rejected(tmp_path: Path, change, code: str) -> None:
    assert _invalid(tmp_path, _variant(change)).code == code


def test_approval_signs_and_verifies(settings: Settings) -> None:
    store = ensure_platform_keys(settings, [], on_event=None)
    policy = approve_policy(settings, store, DEFAULT_POLICY_FILE)
    assert policy.path == approved_path(settings, 1)
    assert policy.signature_key == "platform/signing/v1"
    assert verify_file(policy.path, store).kind == "masking_policy"
    assert load_approved_policy(settings, store).sm3 == policy.sm3
    assert approve_policy(settings, store, DEFAULT_POLICY_FILE).sm3 == policy.sm3  # same content: no change


def test_approved_version_is_immutable(settings: Settings, tmp_path: Path) -> None:
    store = ensure_platform_keys(settings, [], on_event=None)
    approve_policy(settings, store, DEFAULT_POLICY_FILE)
    edited = _variant(lambda document: _rule(document, "keep-amount").update(description="改过的说明"))
    with pytest.raises(PolicyInvalid) as caught:
        approve_policy(settings, store, _write(tmp_path, edited))
    assert caught.value.code == "POLICY_VERSION_EXISTS"

    edited["version"] = 2
    assert approve_policy(settings, store, _write(tmp_path, edited, "v2.yaml")).version == 2
    assert load_approved_policy(settings, store).version == 2
    assert ensure_default_policy(settings, store).version == 2


def test_edited_approved_policy_refused(settings: Settings) -> None:
    store = ensure_platform_keys(settings, [], on_event=None)
    policy = approve_policy(settings, store, DEFAULT_POLICY_FILE)
    policy.path.write_text(policy.path.read_text("utf-8").replace("version: 1", "version: 1\n# edited"), "utf-8")
    with pytest.raises(PolicyNotApproved) as caught:
        load_approved_policy(settings, store)
    assert caught.value.code == "POLICY_SIGNATURE_INVALID"
    assert "签名验证失败" in caught.value.message


def test_no_approved_policy(settings: Settings) -> None:
    store = ensure_platform_keys(settings, [], on_event=None)
    with pytest.raises(PolicyNotApproved) as caught:
        load_approved_policy(settings, store)
    assert caught.value.code == "POLICY_NOT_APPROVED"


def _run_cli(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(settings.data_dir)}
    return subprocess.run([sys.executable, "-m", "extracts", *arguments], cwd=PROJECT_ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_cli_check_and_approve(settings: Settings, tmp_path: Path) -> None:
    ensure_platform_keys(settings, [], on_event=None)
    checked = _run_cli(settings, "policy", "check")
    assert checked.returncode == 0, checked.stderr
    assert "校验通过" in checked.stdout

    bad = _write(tmp_path, _variant(lambda document: _rule(document, "drop-c3").update(treatment="keep")))
    rejected = _run_cli(settings, "policy", "approve", str(bad))
    assert rejected.returncode == 2
    assert "POLICY_C3_NOT_DROPPED" in rejected.stderr and "Traceback" not in rejected.stderr
    assert not approved_path(settings, 1).exists()

    approved = _run_cli(settings, "policy", "approve", str(DEFAULT_POLICY_FILE))
    assert approved.returncode == 0, approved.stderr
    assert "已审批脱敏策略" in approved.stdout
    assert approved_path(settings, 1).with_name("v1.yaml.sig").is_file()


def test_default_policy_declares_quasi_identifiers() -> None:
    policy = load_policy(DEFAULT_POLICY_FILE)
    demo = policy.quasi_identifiers_of("applications")
    assert [item.column for item in demo] == ["age_in_years", "personal_status_and_sex"]
    assert [band.label for band in demo[0].bands] == ["35 岁以下", "35 岁及以上"]
    customers = {item.column: item for item in policy.quasi_identifiers_of("EAST_DGKHXXB")}
    assert customers["XZQHDM"].prefix == 4
    assert customers["ZCZB"].generalisation() == {"bands": ["[0, 100万)", "[100万, 1000万)", "[1000万, 1亿)", "[1亿, +∞)"]}
    assert policy.quasi_identifiers_of("TEST_UNKNOWN") == ()


@pytest.mark.parametrize(
    ("quasi_identifiers", "fragment"),
    [
        (["applications"], "须为对象"),
        ({"bad table!": [{"column": "A"}]}, "数据表名 'bad table!' 无效"),
        ({"applications": []}, "须为非空列表"),
        ({"applications": ["age_in_years"]}, "第 1 项须为对象并含 column"),
        ({"applications": [{"column": "age in years"}]}, "第 1 项须为对象并含 column"),
        ({"applications": [{"column": "age_in_years", "mask": True}]}, "未知字段 mask"),
        ({"applications": [{"column": "age_in_years", "prefix": 2, "bands": [{"below": 1, "label": "a"}, {"label": "b"}]}]},
         "同时声明了 bands 和 prefix"),
        ({"applications": [{"column": "age_in_years", "prefix": 0}]}, "prefix 0 无效"),
        ({"applications": [{"column": "age_in_years", "prefix": "4"}]}, "prefix '4' 无效"),
        ({"applications": [{"column": "age_in_years", "prefix": 33}]}, "prefix 33 无效"),
        ({"applications": [{"column": "job"}, {"column": "job"}]}, "字段重复：job"),
    ],
)
def test_invalid_quasi_identifiers_rejected(tmp_path: Path, quasi_identifiers, fragment: str) -> None:
    error = _invalid(tmp_path, _variant(lambda document: document.update(quasi_identifiers=quasi_identifiers)))
    assert error.code == "POLICY_QUASI_IDENTIFIER_INVALID"
    assert fragment in error.message


def test_invalid_quasi_identifier_bands_rejected(tmp_path: Path) -> None:
    bands = [{"below": 35, "label": "青年"}, {"below": 30, "label": "中年"}, {"label": "老年"}]
    error = _invalid(tmp_path, _variant(
        lambda document: document.update(quasi_identifiers={"applications": [{"column": "age_in_years", "bands": bands}]})))
    assert error.code == "POLICY_BANDS_INVALID"
    assert "准标识符 applications.age_in_years" in error.message


def test_policy_without_quasi_identifiers_loads(tmp_path: Path) -> None:
    document = _variant(lambda document: document.pop("quasi_identifiers"))
    assert load_policy(_write(tmp_path, document)).quasi_identifiers == ()


def test_build_never_approves_a_policy(settings: Settings) -> None:
    load_demo(settings)
    ensure_platform_keys(settings, ["bank_a"], on_event=None)

    with pytest.raises(PolicyNotApproved) as caught:
        build_extract(settings, "bank_a")
    assert caught.value.code == "POLICY_NOT_APPROVED"
    assert approved_versions(settings) == []
    assert not (settings.extracts_dir / "bank_a").exists()

    command = _run_cli(settings, "build", "--institution", "bank_a")
    assert command.returncode != 0
    assert "没有已审批的脱敏策略" in command.stderr
    assert "Traceback" not in command.stderr
    assert approved_versions(settings) == []
