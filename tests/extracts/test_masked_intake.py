"""Masked extracts built from real intake warehouse partitions of three institutions."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.classes import ColumnClass
from extracts.builder import (
    ExtractDirNotWritable,
    ExtractKeyMissingError,
    build_institution,
    extract_dir,
)
from extracts.policy import PolicyNotApproved, approve_policy, load_policy
from extracts.publish import builds_dir
from extracts.sources import ExtractSourceError, decrypt_intake, intake_tables
from intake.warehouse import load_submission
from regsandbox_core.crypto import keyed_token
from regsandbox_core.keystore import KeyStore
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings
from regsandbox_core.signing import verify_file
from tests.extract_setup import approve_shipped_policy

INSTITUTIONS = ("bank_a", "bank_b", "bank_c")
JANUARY = date(2025, 1, 31)
FEBRUARY = date(2025, 2, 28)
CUSTOMERS = "TEST_KHXX"
LOANS = "TEST_DKXX"
CUSTOMER_FIELDS = ("KHTYBH", "KHMC", "ZJHM", "SJHM", "YHKH", "CSRQ", "DZ", "JYMM", "BZ", "CJRQ")
LOAN_FIELDS = ("HTH", "ZJHM", "DKJE", "YE", "CJRQ")

CLASSES: dict[tuple[str, str], ColumnClass] = {
    (CUSTOMERS, "KHTYBH"): ColumnClass(3, "C2", "account_no"),
    (CUSTOMERS, "KHMC"): ColumnClass(3, "C2", "person_name"),
    (CUSTOMERS, "ZJHM"): ColumnClass(3, "C2", "resident_id"),
    (CUSTOMERS, "SJHM"): ColumnClass(3, "C2", "mobile"),
    (CUSTOMERS, "YHKH"): ColumnClass(3, "C2", "bank_card"),
    (CUSTOMERS, "CSRQ"): ColumnClass(3, "C2", "birth_date"),
    (CUSTOMERS, "DZ"): ColumnClass(3, "C2", "address"),
    (CUSTOMERS, "JYMM"): ColumnClass(4, "C3", "auth_secret"),
    (CUSTOMERS, "BZ"): ColumnClass(4, None, "other"),
    (CUSTOMERS, "CJRQ"): ColumnClass(1, None, "other"),
    (LOANS, "HTH"): ColumnClass(2, None, "other"),
    (LOANS, "ZJHM"): ColumnClass(3, "C2", "resident_id"),
    (LOANS, "DKJE"): ColumnClass(4, None, "amount"),
    (LOANS, "YE"): ColumnClass(2, "C1", "amount"),
    (LOANS, "CJRQ"): ColumnClass(1, None, "other"),
}
"""Classes of the test templates. CUSTOMERS.BZ (a remark) has the class the catalog exports for a column
without a proposal that no steward confirmed: level 4 ``other``."""

SHARED_ID = "110101198503127719"
"""Resident ID of a person who is a customer of bank_a and of bank_b."""


def _person(code: str, number: int) -> dict[str, str]:
    """Return one customer row; values differ by institution except the shared person (number 0 at bank_a and bank_b)."""
    index = INSTITUTIONS.index(code)
    shared = number == 0 and code in ("bank_a", "bank_b")
    return {
        "KHTYBH": f"KH{index}{number:05d}",
        "KHMC": "欧阳明华" if shared else ["张伟", "李秀英", "王"][number % 3] + f"{index}{number}",
        "ZJHM": SHARED_ID if shared else f"3101151990{index:02d}{number:04d}{index}X"[:18],
        "SJHM": f"139{index:02d}{number:06d}",
        "YHKH": f"622202{index:03d}{number:010d}",
        "CSRQ": f"19{80 + number % 20}0{1 + number % 9}1{number % 10}",
        "DZ": ["上海市浦东新区世纪大道100号", "浙江省杭州市西湖区文三路90号", "内蒙古自治区呼和浩特市新城区1号"][number % 3]
        + f"{index}{number}室",
        "JYMM": f"pw-{index}-{number}-secret",
        "BZ": f"备注{index}-{number}-客户经理口述",
        "CJRQ": "20250131",
    }


def _loan(code: str, number: int, amount: str) -> dict[str, str]:
    return {"HTH": f"HT{INSTITUTIONS.index(code)}{number:05d}", "ZJHM": _person(code, number)["ZJHM"],
            "DKJE": amount, "YE": "1000.50", "CJRQ": "20250131"}


def _staged(tmp_path: Path, name: str, fields: tuple[str, ...], rows: list[dict[str, str]]) -> Path:
    path = tmp_path / f"{name}.parquet"
    columns = {code: pa.array([row.get(code) for row in rows], pa.string()) for code in fields}
    columns["_line"] = pa.array(range(2, len(rows) + 2), pa.int64())
    pq.write_table(pa.table(columns), path)
    return path


def _load(settings: Settings, store: KeyStore, tmp_path: Path, code: str, template: str, fields: tuple[str, ...],
          rows: list[dict[str, str]], period: date, submission_id: int) -> None:
    staged = _staged(tmp_path, f"{code}-{template}-{period}-{submission_id}", fields, rows)
    load_submission(settings, store, institution_code=code, template_code=template, template_version=1,
                    field_codes=fields, period_end=period, staged_path=staged, submission_id=submission_id,
                    version=1, raw_sm3=f"{submission_id:064d}").finish()


AMOUNTS = ["500", "25000.00", "250000", "2500000", "99999999", "not a number"]


@pytest.fixture
def warehouse(tmp_path: Path) -> tuple[Settings, KeyStore, dict[str, list[dict[str, str]]]]:
    """A data dir with customers and loans of three institutions for January; returns the raw rows by institution."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    settings = Settings(data_dir=data_dir)
    store = ensure_platform_keys(settings, list(INSTITUTIONS), on_event=None)
    approve_shipped_policy(settings)
    raw: dict[str, list[dict[str, str]]] = {}
    for offset, code in enumerate(INSTITUTIONS):
        customers = [_person(code, number) for number in range(6)]
        loans = [_loan(code, number, AMOUNTS[number]) for number in range(6)]
        _load(settings, store, tmp_path, code, CUSTOMERS, CUSTOMER_FIELDS, customers, JANUARY, 10 + offset)
        _load(settings, store, tmp_path, code, LOANS, LOAN_FIELDS, loans, JANUARY, 20 + offset)
        raw[code] = customers + loans
    return settings, store, raw


def _table(settings: Settings, code: str, name: str) -> list[dict]:
    con = duckdb.connect()
    try:
        relation = con.sql(f"SELECT * FROM read_parquet('{extract_dir(settings, code) / (name + '.parquet')}')")
        return [dict(zip(relation.columns, row)) for row in relation.fetchall()]
    finally:
        con.close()


def _customers(settings: Settings, code: str) -> list[dict]:
    """Return the masked customers in customer order: the masked mobile ends in the customer number."""
    return sorted(_table(settings, code, "test_khxx"), key=lambda row: row["SJHM"])


def _manifest(settings: Settings, code: str) -> dict:
    return json.loads((extract_dir(settings, code) / "manifest.json").read_text("utf-8"))


def _sensitive_values(raw: dict[str, list[dict[str, str]]]) -> set[str]:
    """Every raw value of a C2 or C3 column, and of the unconfirmed remark column."""
    values = set()
    for rows in raw.values():
        for row in rows:
            for template in (CUSTOMERS, LOANS):
                for field, value in row.items():
                    column_class = CLASSES.get((template, field))
                    if field == "BZ" or (column_class is not None and column_class.pi_category in ("C2", "C3")):
                        values.add(value)
    return values


def _builds(settings: Settings, code: str) -> list[str]:
    return sorted(path.name for path in builds_dir(settings, code).iterdir() if not path.name.startswith("."))


def _all_files(settings: Settings) -> list[Path]:
    return [path for path in settings.extracts_dir.rglob("*") if path.is_file()]


def test_no_raw_sensitive_value_in_any_extract_file(warehouse, tmp_path: Path) -> None:
    settings, _store, raw = warehouse
    for code in INSTITUTIONS:
        build_institution(settings, code, classes=CLASSES)
    # A second period makes the next build merge the previous table with the new period.
    for offset, code in enumerate(INSTITUTIONS):
        loans = [_loan(code, number, "77") for number in range(3)]
        _load(settings, _store, tmp_path, code, LOANS, LOAN_FIELDS, loans, FEBRUARY, 60 + offset)
        raw[code] = raw[code] + loans
        build_institution(settings, code, classes=CLASSES)

    sensitive = _sensitive_values(raw)
    assert SHARED_ID in sensitive and "pw-0-1-secret" in sensitive
    files = _all_files(settings)  # current and previous builds
    published = [path for code in INSTITUTIONS for path in extract_dir(settings, code).iterdir()]
    assert len([path for path in published if path.suffix == ".parquet"]) == 6
    assert len([path for path in files if path.suffix == ".parquet"]) == 6 + 6
    for path in files:
        content = path.read_bytes()
        for value in sensitive:
            assert value.encode("utf-8") not in content, (path, value)
    # Parquet pages are compressed, so the decoded cells are searched as well.
    con = duckdb.connect()
    for path in files:
        if path.suffix != ".parquet":
            continue
        relation = con.sql(f"SELECT * FROM read_parquet('{path}')")
        for row in relation.fetchall():
            for cell in row:
                text = str(cell)
                for value in sensitive:
                    assert value not in text, (path, value, text)
    con.close()


def test_treatments_per_class(warehouse) -> None:
    settings, store, _raw = warehouse
    build_institution(settings, "bank_a", classes=CLASSES)
    key = store.current("bank_a", "token").key

    customers = _customers(settings, "bank_a")  # masked rows are not in warehouse order
    first = customers[0]
    assert list(first) == ["KHTYBH", "KHMC", "ZJHM", "SJHM", "YHKH", "CSRQ", "DZ", "BZ", "CJRQ", "_period"]
    assert first["KHTYBH"] == keyed_token(key, "KH000000")
    assert first["KHMC"] == "欧阳**"
    assert first["ZJHM"] == keyed_token(key, SHARED_ID)
    assert first["SJHM"] == "139****0000"
    assert first["YHKH"] == keyed_token(key, "6222020000000000000")
    assert first["CSRQ"] == "1980"
    assert first["DZ"] == "上海市"
    assert first["BZ"] == keyed_token(key, "备注0-0-客户经理口述")
    assert (first["CJRQ"], first["_period"]) == ("20250131", "20250131")
    assert [row["KHMC"] for row in customers[1:3]] == ["李****", "王**"]
    assert customers[1]["DZ"] == "浙江省杭州市"
    assert customers[2]["DZ"] == "内蒙古自治区呼和浩特市"

    loans = sorted(_table(settings, "bank_a", "test_dkxx"), key=lambda row: row["HTH"])
    assert [row["DKJE"] for row in loans] == ["[0, 1万)", "[1万, 10万)", "[10万, 100万)", "[100万, 1000万)",
                                              "[1000万, +∞)", None]
    # YE is the watermark carrier: its second decimal may move by 0.01 and its text keeps its format.
    tables = {table["name"]: table for table in _manifest(settings, "bank_a")["tables"]}
    assert tables["test_dkxx"]["watermark"]["carrier"] == "YE"
    assert {row["YE"] for row in loans} <= {"1000.50", "1000.51"}
    assert loans[0]["ZJHM"] == first["ZJHM"]  # the same person joins across tables of one institution


def test_manifest_records_classes_and_treatments(warehouse) -> None:
    settings, store, _raw = warehouse
    outcome = build_institution(settings, "bank_a", classes=CLASSES)
    folder = extract_dir(settings, "bank_a")
    manifest = _manifest(settings, "bank_a")

    assert verify_file(folder / "manifest.json", store).kind == "extract_manifest"
    assert outcome.status == "published" and outcome.manifest_sm3
    assert manifest["policy"]["version"] == 1 and manifest["policy"]["signature_key"] == "platform/signing/v1"
    assert manifest["key_versions"] == {"token": "bank_a/token/v1", "signing": "platform/signing/v1",
                                        "data": ["bank_a/data/v1"]}
    tables = {table["name"]: table for table in manifest["tables"]}
    assert sorted(tables) == ["test_dkxx", "test_khxx"]
    customers = tables["test_khxx"]
    columns = {column["name"]: column for column in customers["columns"]}
    assert columns["BZ"]["class"] == {"level": 4, "pi_category": None, "kind": "other"}
    assert columns["BZ"]["treatment"] == "token"
    assert columns["ZJHM"]["rule"] == "token-identifiers"
    assert columns["_period"]["treatment"] == "keep"
    assert [column["name"] for column in customers["dropped_columns"]] == ["JYMM"]
    assert customers["dropped_columns"][0]["rule"] == "drop-c3"
    assert customers["row_count"] == 6
    (partition,) = customers["source"]["partitions"]
    assert (partition["period"], partition["submission_id"], partition["rows"]) == ("20250131", 10, 6)
    assert len(partition["partition_sm3"]) == 64
    detail = outcome.audit_detail()
    assert detail["institution"] == "bank_a" and {table["name"] for table in detail["tables"]} == set(tables)


def test_tokens_stable_within_institution_and_unlinkable_across(warehouse) -> None:
    settings, _store, _raw = warehouse
    for code in ("bank_a", "bank_b"):
        build_institution(settings, code, classes=CLASSES)
    token_a = _customers(settings, "bank_a")[0]["ZJHM"]
    token_b = _customers(settings, "bank_b")[0]["ZJHM"]
    assert token_a != token_b

    tokens = {code: {row["ZJHM"] for row in _table(settings, code, "test_khxx")} for code in ("bank_a", "bank_b")}
    assert not tokens["bank_a"] & tokens["bank_b"]

    # Within one institution a person has the same token in every table.
    assert {row["ZJHM"] for row in _table(settings, "bank_a", "test_dkxx")} == tokens["bank_a"]


def test_token_key_rotation_changes_tokens(warehouse) -> None:
    settings, store, _raw = warehouse
    build_institution(settings, "bank_a", classes=CLASSES)
    before = [row["ZJHM"] for row in _customers(settings, "bank_a")]

    assert store.rotate("bank_a", "token") == 2
    outcome = build_institution(settings, "bank_a", classes=CLASSES)
    after = [row["ZJHM"] for row in _customers(settings, "bank_a")]

    assert outcome.status == "published" and all(table.rebuilt for table in outcome.tables)
    assert not set(before) & set(after)
    assert after[0] == keyed_token(store.current("bank_a", "token").key, SHARED_ID)
    assert _manifest(settings, "bank_a")["token_key"] == "bank_a/token/v2"


def test_unchanged_warehouse_writes_nothing(warehouse) -> None:
    settings, _store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    second = build_institution(settings, "bank_a", classes=CLASSES)
    assert second.status == "unchanged"
    assert second.build_id == first.build_id
    assert not any(table.rebuilt for table in second.tables)
    assert _builds(settings, "bank_a") == [first.build_id]


def test_new_period_rebuilds_only_its_table(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    old_customers = first.folder / "test_khxx.parquet"

    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 7, "123")], FEBRUARY, 30)
    second = build_institution(settings, "bank_a", classes=CLASSES)

    rebuilt = {table.name: (table.rebuilt, table.periods_rebuilt) for table in second.tables}
    assert rebuilt == {"test_khxx": (False, ()), "test_dkxx": (True, ("20250228",))}
    assert second.build_id != first.build_id
    assert os.path.realpath(extract_dir(settings, "bank_a")) == str(second.folder)
    assert (second.folder / "test_khxx.parquet").stat().st_ino == old_customers.stat().st_ino
    loans = {table["name"]: table for table in _manifest(settings, "bank_a")["tables"]}["test_dkxx"]
    assert [partition["period"] for partition in loans["source"]["partitions"]] == ["20250131", "20250228"]
    assert loans["row_count"] == 7
    assert [row["_period"] for row in _table(settings, "bank_a", "test_dkxx")] == ["20250131"] * 6 + ["20250228"]
    # The previous build stays for readers that resolved the link before the switch.
    assert first.folder.is_dir()


def test_other_token_format_masks_every_table_again(warehouse, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings, store, _raw = warehouse
    # A build made when tokens had another format (as 64 hex digits before 2026-12-05).
    monkeypatch.setattr("extracts.builder.TOKEN_SCHEME", "hmac-sm3-256-hex")
    build_institution(settings, "bank_a", classes=CLASSES)
    monkeypatch.undo()
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 7, "123")], FEBRUARY, 31)

    outcome = build_institution(settings, "bank_a", classes=CLASSES)

    # The loans are masked again in full instead of merged with the table of the older format.
    rebuilt = {table.name: (table.rebuilt, table.periods_rebuilt) for table in outcome.tables}
    assert rebuilt == {"test_khxx": (True, ("20250131",)), "test_dkxx": (True, ("20250131", "20250228"))}
    key = store.current("bank_a", "token").key
    assert {row["ZJHM"] for row in _table(settings, "bank_a", "test_dkxx")} == {
        keyed_token(key, _person("bank_a", number)["ZJHM"]) for number in (0, 1, 2, 3, 4, 5, 7)}


def test_changed_class_rebuilds_table(warehouse) -> None:
    settings, _store, _raw = warehouse
    build_institution(settings, "bank_a", classes=CLASSES)
    changed = {**CLASSES, (CUSTOMERS, "BZ"): ColumnClass(2, None, "other")}
    outcome = build_institution(settings, "bank_a", classes=changed)
    assert {table.name: table.rebuilt for table in outcome.tables} == {"test_khxx": True, "test_dkxx": False}
    assert _customers(settings, "bank_a")[0]["BZ"] == "备注0-0-客户经理口述"


def test_accepted_ids_leave_out_other_submissions(warehouse) -> None:
    settings, _store, _raw = warehouse
    outcome = build_institution(settings, "bank_a", classes=CLASSES, accepted_ids={CUSTOMERS: [10], LOANS: []})
    assert [table.name for table in outcome.tables] == ["test_khxx"]


def test_missing_token_key_publishes_nothing(warehouse) -> None:
    settings, store, _raw = warehouse
    store.revoke("bank_c", "token", 1, "test")
    with pytest.raises(ExtractKeyMissingError) as caught:
        build_institution(settings, "bank_c", classes=CLASSES)
    assert caught.value.code == "EXTRACT_KEY_MISSING"
    assert "bank_c/token" in caught.value.message
    assert not extract_dir(settings, "bank_c").exists()
    assert not builds_dir(settings, "bank_c").exists()


def test_extract_dir_not_writable(warehouse) -> None:
    settings, _store, _raw = warehouse
    settings.extracts_dir.write_text("not a folder")
    with pytest.raises(ExtractDirNotWritable) as caught:
        build_institution(settings, "bank_a", classes=CLASSES)
    assert caught.value.code == "EXTRACT_DIR_NOT_WRITABLE"
    assert str(settings.extracts_dir) in caught.value.message
    assert settings.extracts_dir.read_text() == "not a folder"


def test_failure_after_tables_keeps_old_extract(warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 7, "123")], FEBRUARY, 30)

    def broken_sign(*_arguments, **_options):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("extracts.builder.sign_file", broken_sign)
    with pytest.raises(Exception) as caught:
        build_institution(settings, "bank_a", classes=CLASSES)
    assert caught.value.code == "EXTRACT_WRITE_FAILED"
    assert os.path.realpath(extract_dir(settings, "bank_a")) == str(first.folder)
    assert _builds(settings, "bank_a") == [first.build_id]
    assert _manifest(settings, "bank_a")["build_id"] == first.build_id


def test_unsigned_policy_refused(warehouse, tmp_path: Path) -> None:
    settings, _store, _raw = warehouse
    policy = load_policy(Path(__file__).resolve().parents[2] / "extracts" / "policies" / "default.v1.yaml")
    with pytest.raises(PolicyNotApproved) as caught:
        build_institution(settings, "bank_a", classes=CLASSES, policy=policy)
    assert caught.value.code == "POLICY_NOT_APPROVED"
    assert not extract_dir(settings, "bank_a").exists()


def test_tampered_policy_refused(warehouse) -> None:
    settings, store, _raw = warehouse
    policy = approve_policy(settings, store, Path(__file__).resolve().parents[2] / "extracts" / "policies" / "default.v1.yaml")
    text = policy.path.read_text("utf-8").replace("treatment: partial_mask", "treatment: token", 1)
    policy.path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyNotApproved) as caught:
        build_institution(settings, "bank_a", classes=CLASSES, policy=policy)
    assert caught.value.code == "POLICY_SIGNATURE_INVALID"
    with pytest.raises(PolicyNotApproved):
        build_institution(settings, "bank_a", classes=CLASSES)
    assert not extract_dir(settings, "bank_a").exists()


def test_kernel_reads_intake_extract(warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    import regsandbox_kernel.extract as kernel

    settings, _store, _raw = warehouse
    build_institution(settings, "bank_b", classes=CLASSES)
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(extract_dir(settings, "bank_b")))
    monkeypatch.setenv("REGSANDBOX_INSTITUTION", "bank_b")
    monkeypatch.delenv("REGSANDBOX_TRUSTED_KEYS", raising=False)
    con = kernel.connect()
    try:
        assert con.sql("SELECT count(*) FROM test_khxx").fetchall() == [(6,)]
        assert con.sql("SELECT count(*) FROM test_dkxx JOIN test_khxx USING (ZJHM)").fetchall() == [(6,)]
    finally:
        con.close()


def test_changed_period_masks_only_that_period(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 7, "123")], FEBRUARY, 30)
    first = build_institution(settings, "bank_a", classes=CLASSES)
    assert {table.name: table.periods_rebuilt for table in first.tables} == {
        "test_khxx": ("20250131",), "test_dkxx": ("20250131", "20250228")}

    # A corrected January submission (version 2) replaces that period only. February is copied
    # from the previous table, and the corrected rows follow it.
    staged = _staged(tmp_path, "january-v2", LOAN_FIELDS, [_loan("bank_a", 1, "42")])
    load_submission(settings, store, institution_code="bank_a", template_code=LOANS, template_version=1,
                    field_codes=LOAN_FIELDS, period_end=JANUARY, staged_path=staged, submission_id=40, version=2,
                    raw_sm3="4" * 64).finish()
    second = build_institution(settings, "bank_a", classes=CLASSES)

    assert {table.name: table.periods_rebuilt for table in second.tables} == {"test_khxx": (), "test_dkxx": ("20250131",)}
    rows = _table(settings, "bank_a", "test_dkxx")
    assert [(row["HTH"], row["DKJE"], row["_period"]) for row in rows] == [
        ("HT000007", "[0, 1万)", "20250228"), ("HT000001", "[0, 1万)", "20250131")]

    # A new March period masks March alone.
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 2, "5")], date(2025, 3, 31), 41)
    third = build_institution(settings, "bank_a", classes=CLASSES)
    assert {table.name: table.periods_rebuilt for table in third.tables} == {"test_khxx": (), "test_dkxx": ("20250331",)}
    assert [row["_period"] for row in _table(settings, "bank_a", "test_dkxx")] == ["20250228", "20250131", "20250331"]
    loans = {table["name"]: table for table in _manifest(settings, "bank_a")["tables"]}["test_dkxx"]
    assert [partition["period"] for partition in loans["source"]["partitions"]] == ["20250131", "20250228", "20250331"]
    assert loans["row_count"] == 3


def test_repeated_values_keep_row_count(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    loans = [_loan("bank_a", 1, "10"), _loan("bank_a", 1, "20"), _loan("bank_a", 1, "30")]
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, loans, FEBRUARY, 50)
    build_institution(settings, "bank_a", classes=CLASSES)
    february = [row for row in _table(settings, "bank_a", "test_dkxx") if row["_period"] == "20250228"]
    assert len(february) == 3
    assert len({row["ZJHM"] for row in february}) == 1


def test_person_in_several_periods_has_one_token(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    february = [_loan("bank_a", number, "40") for number in (0, 1, 9)]
    march = [_loan("bank_a", number, "50") for number in (1, 9)]
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, february, FEBRUARY, 51)
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, march, date(2025, 3, 31), 52)
    build_institution(settings, "bank_a", classes=CLASSES)

    key = store.current("bank_a", "token").key
    loans = _table(settings, "bank_a", "test_dkxx")
    assert len(loans) == 6 + 3 + 2
    for row in loans:
        number = int(row["HTH"][-5:])
        assert row["ZJHM"] == keyed_token(key, _person("bank_a", number)["ZJHM"]), row
    assert len({row["ZJHM"] for row in loans if row["HTH"].endswith("00001")}) == 1


def test_damaged_partition_publishes_nothing(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 7, "123")], FEBRUARY, 53)
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 8, "456")], date(2025, 3, 31), 54)
    (loans,) = [table for table in intake_tables(settings, "bank_a") if table.catalog_table == LOANS]
    damaged = next(partition.path for partition in loans.partitions if partition.period == "20250228")
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0x01
    damaged.write_bytes(bytes(content))

    with pytest.raises(ExtractSourceError) as caught:
        build_institution(settings, "bank_a", classes=CLASSES)

    assert caught.value.code == "EXTRACT_PARTITION_UNREADABLE"
    assert "20250228" in caught.value.message
    assert "原有提取保持不变" in caught.value.message
    assert not extract_dir(settings, "bank_a").exists()
    assert not list(settings.warehouse_dir.glob(".extract-work-*"))


def test_stale_work_folder_deleted(warehouse) -> None:
    settings, _store, _raw = warehouse
    stale = settings.warehouse_dir / ".extract-work-killed"
    stale.mkdir(mode=0o700)
    (stale / "TEST_KHXX.20250131.parquet").write_bytes(b"plaintext left by a killed build")
    recent = settings.warehouse_dir / ".extract-work-running"
    recent.mkdir(mode=0o700)
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))

    build_institution(settings, "bank_a", classes=CLASSES)

    assert not stale.exists()
    assert recent.is_dir()
    assert sorted(path.name for path in settings.warehouse_dir.glob(".extract-work-*")) == [".extract-work-running"]


def test_table_without_partitions_decrypts_nothing(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    (loans,) = [table for table in intake_tables(settings, "bank_a") if table.catalog_table == LOANS]
    assert decrypt_intake(store, "bank_a", replace(loans, partitions=()), tmp_path) == []
    assert [path.name for path in decrypt_intake(store, "bank_a", loans, tmp_path)] == ["test_dkxx.20250131.parquet"]
