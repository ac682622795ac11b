"""Cross-institution features over a crafted warehouse of seven institutions with the EAST credit templates.

Each customer's lenders, amounts, overdue loans and guarantee contracts are chosen so that every
feature's value and the number of other institutions behind it are known in advance.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import date
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stdnum.cn import uscc

from catalog.classes import ColumnClass, effective_class
from catalog.detectors import propose
from extracts.builder import build_all, build_institution, extract_dir
from extracts.features import FEATURE_COLUMNS, FEATURES_TABLE
from extracts.sources import ExtractSourceError
from intake.template_model import TemplateCatalog
from intake.warehouse import load_submission
from regsandbox_core.crypto import keyed_token
from regsandbox_core.keystore import KeyStore
from regsandbox_core.platform_keys import ensure_platform_keys, open_keystore
from regsandbox_core.settings import Settings
from tests.extract_setup import approve_shipped_policy

BANKS = ("bank_a", "bank_b", "bank_c", "bank_d", "bank_e", "bank_f", "bank_g")
PERIOD = date(2025, 3, 31)
CUSTOMERS, CONTRACTS, LOANS, GUARANTEES = "EAST_DGKHXXB", "EAST_XDHTB", "EAST_DGXDYWJJB", "EAST_DBHTB"

# Customer -> the banks that lend to it. S7 borrows at all seven banks, S3 at three, S2 at two.
LENDERS: dict[str, tuple[str, ...]] = {
    "S7": BANKS,
    "S3": ("bank_a", "bank_b", "bank_c"),
    "S2": ("bank_a", "bank_b"),
    "A1": ("bank_a",),
    "G1": ("bank_g",),
    # Guarantee circle C1 -> C2 -> C3 -> C1 reported by bank_a, bank_b and bank_c.
    "C2": ("bank_a",), "C3": ("bank_b",), "C1": ("bank_c",),
    # Guarantee circle H1 -> H2 -> ... -> H6 -> H1 reported by bank_b to bank_g; bank_a lends to H1 only.
    "H2": ("bank_b",), "H3": ("bank_c",), "H4": ("bank_d",), "H5": ("bank_e",), "H6": ("bank_f",),
    "H1": ("bank_a", "bank_g"),
    # Guarantee circle J1 <-> J2 formed by bank_a's contracts alone.
    "J1": ("bank_a",), "J2": ("bank_a",),
}
# (lender, borrower) -> guarantor of the borrower's contract at that lender.
GUARANTORS: dict[tuple[str, str], str] = {
    ("bank_a", "C2"): "C1", ("bank_b", "C3"): "C2", ("bank_c", "C1"): "C3",
    ("bank_b", "H2"): "H1", ("bank_c", "H3"): "H2", ("bank_d", "H4"): "H3", ("bank_e", "H5"): "H4",
    ("bank_f", "H6"): "H5", ("bank_g", "H1"): "H6",
    ("bank_a", "J1"): "J2", ("bank_a", "J2"): "J1",
}
OVERDUE = {("bank_c", "S7"), ("bank_c", "S3")}
NONPERFORMING = {("bank_d", "S7")}
USD = {("bank_g", "S7")}


def customer_uscc(customer: str) -> str:
    """Return a valid 统一社会信用代码 for a test customer."""
    body = f"91310115{sum(ord(char) * 1000 ** index for index, char in enumerate(customer)) % 10**9:09d}"
    return body + uscc.calc_check_digit(body)


def licence(bank: str) -> str:
    return f"B{BANKS.index(bank) + 1:04d}H2310000{BANKS.index(bank) + 1:02d}"


def customer_no(bank: str, customer: str) -> str:
    return f"{bank[-1].upper()}-KH-{customer}"


def contract_amount(bank: str, customer: str) -> Decimal:
    return Decimal(1_000_000 * (BANKS.index(bank) + 1) + len(LENDERS[customer])) + Decimal("0.25")


def loan_balance(bank: str, customer: str) -> Decimal:
    return Decimal(100_000 * (BANKS.index(bank) + 1) + len(LENDERS[customer])) + Decimal("0.10")


def _rows(bank: str) -> dict[str, list[dict[str, str]]]:
    """Return the bank's rows of the four templates."""
    rows: dict[str, list[dict[str, str]]] = {CUSTOMERS: [], CONTRACTS: [], LOANS: [], GUARANTEES: []}
    base = {"JRXKZH": licence(bank), "NBJGH": f"{bank}-branch", "CJRQ": PERIOD.strftime("%Y%m%d")}
    for customer, banks in LENDERS.items():
        if bank not in banks:
            continue
        identity = {"KHTYBH": customer_no(bank, customer), "KHMC": f"测试{customer}有限公司"}
        currency = "USD" if (bank, customer) in USD else "CNY"
        contract_no = f"{bank}-HT-{customer}"
        guarantee_no = f"{bank}-DB-{customer}"
        guarantor = GUARANTORS.get((bank, customer))
        rows[CUSTOMERS].append({**base, **identity, "ZJLX": "01", "ZJHM": customer_uscc(customer)})
        rows[CONTRACTS].append({**base, **identity, "HTH": contract_no, "BZ": currency, "HTZT": "01",
                                "HTJE": str(contract_amount(bank, customer)),
                                "DBHTH": guarantee_no if guarantor else None})
        overdue = (bank, customer) in OVERDUE
        rows[LOANS].append({**base, **identity, "ZJLX": "01", "ZJHM": customer_uscc(customer),
                            "JJH": f"{bank}-JJ-{customer}", "HTH": contract_no, "BZ": currency,
                            "JJJE": str(contract_amount(bank, customer)), "JJYE": str(loan_balance(bank, customer)),
                            "DKZT": "02" if overdue else "01", "YQTS": "45" if overdue else "0",
                            "WJFL": "03" if (bank, customer) in NONPERFORMING else "01"})
        if guarantor:
            rows[GUARANTEES].append({**base, "DBHTH": guarantee_no, "BDBHTH": contract_no, "DBLX": "01",
                                     "DBRMC": f"测试{guarantor}有限公司", "DBRZJLX": "01",
                                     "DBRZJHM": customer_uscc(guarantor), "BZ": "CNY", "DBJE": "500000.00",
                                     "DBHTZT": "01"})
    return rows


def _load(settings: Settings, store: KeyStore, tmp_path: Path, bank: str, template: str, rows: list[dict[str, str]],
          submission_id: int, period: date = PERIOD) -> None:
    fields = [field.code for field in TemplateCatalog.load().get(template).fields]
    staged = tmp_path / f"staged-{bank}-{template}-{submission_id}.parquet"
    pq.write_table(pa.table({code: pa.array([row.get(code) for row in rows], pa.string()) for code in fields}), staged)
    load_submission(settings, store, institution_code=bank, template_code=template, template_version=1,
                    field_codes=fields, period_end=period, staged_path=staged, submission_id=submission_id,
                    version=1, raw_sm3=f"{submission_id:064d}").finish()


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data dir with the four EAST templates of seven banks for March 2025 and their keys, no extracts."""
    tmp_path = tmp_path_factory.mktemp("features")
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    settings = Settings(data_dir=data_dir)
    store = ensure_platform_keys(settings, list(BANKS), on_event=None)
    approve_shipped_policy(settings)
    submission_id = 100
    for bank in BANKS:
        for template, rows in _rows(bank).items():
            if rows:
                submission_id += 1
                _load(settings, store, tmp_path, bank, template, rows, submission_id)
    return data_dir


def _settings(warehouse: Path, tmp_path: Path, k: int | None = None) -> Settings:
    """Settings of a private copy of the crafted warehouse, with k other institutions at least (default: the setting's default).

    The crafted banks have too few customers for the k-anonymity check of the extract tables
    (tests/extracts/test_kanon.py covers it), so it is turned off here.
    """
    data_dir = tmp_path / "data"
    shutil.copytree(warehouse, data_dir)
    if k is None:
        return Settings(data_dir=data_dir, extract_k_anonymity=1)
    return Settings(data_dir=data_dir, extract_feature_min_contributors=k, extract_k_anonymity=1)


def _classes(overrides: dict[tuple[str, str], ColumnClass] | None = None) -> dict[tuple[str, str], ColumnClass]:
    """Return the catalog's unconfirmed classes of every column of the four templates, with ``overrides`` confirmed."""
    catalog = TemplateCatalog.load()
    classes = {}
    for code in (CUSTOMERS, CONTRACTS, LOANS, GUARANTEES):
        template = catalog.get(code)
        for item in template.fields:
            classes[(code, item.code)] = effective_class(propose(template, item).column_class, None)
    classes.update(overrides or {})
    return classes


@pytest.fixture(scope="module")
def built_default(warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A copy of the crafted warehouse with the extracts of all banks built at the default k."""
    settings = _settings(warehouse, tmp_path_factory.mktemp("default-k"))
    build_all(settings, classes=_classes())
    return settings


@pytest.fixture(scope="module")
def built_k2(warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A copy of the crafted warehouse with the extracts of all banks built at k=2."""
    settings = _settings(warehouse, tmp_path_factory.mktemp("k2"), k=2)
    build_all(settings, classes=_classes())
    return settings


def _features(settings: Settings, bank: str) -> dict[str, dict]:
    """Return the bank's feature rows by raw customer, mapping the key back through the bank's customer numbers."""
    path = extract_dir(settings, bank) / f"{FEATURES_TABLE}.parquet"
    con = duckdb.connect()
    try:
        relation = con.sql(f"SELECT * FROM read_parquet('{path}')")
        rows = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
    finally:
        con.close()
    key = open_keystore(settings).current(bank, "token").key
    by_key = {keyed_token(key, customer_no(bank, customer)): customer for customer, banks in LENDERS.items() if bank in banks}
    by_key.update({customer_no(bank, customer): customer for customer, banks in LENDERS.items() if bank in banks})
    return {by_key[row.pop("KHTYBH")]: row for row in rows}


def _expected(**values: object) -> dict[str, object]:
    """Return a full feature row: every feature NULL unless given."""
    return {column.name: values.get(column.name) for column in FEATURE_COLUMNS}


def _sum(function, banks: tuple[str, ...], customer: str) -> Decimal:
    return sum((function(bank, customer) for bank in banks), Decimal(0))


# --- values and suppression ---------------------------------------------------------------------------


def test_default_k_values_and_suppression(built_default: Settings) -> None:
    settings = built_default
    assert settings.extract_feature_min_contributors == 5
    rows = _features(settings, "bank_a")

    assert set(rows) == {"S7", "S3", "S2", "A1", "C2", "H1", "J1", "J2"}
    five_cny = ("bank_b", "bank_c", "bank_d", "bank_e", "bank_f")  # bank_g lends to S7 in USD
    assert rows["S7"] == _expected(other_lender_count=6,
                                   other_contract_amount=_sum(contract_amount, five_cny, "S7"),
                                   other_loan_balance=_sum(loan_balance, five_cny, "S7"),
                                   other_overdue=True, other_nonperforming=True)
    assert rows["S3"] == _expected()  # two other lenders: everything suppressed
    assert rows["S2"] == _expected()
    assert rows["A1"] == _expected(other_lender_count=0, other_contract_amount=Decimal("0.00"),
                                   other_loan_balance=Decimal("0.00"), other_overdue=False, other_nonperforming=False)
    assert rows["C2"]["guarantee_circle"] is None  # circle of bank_a, bank_b and bank_c: two other institutions
    assert rows["H1"] == _expected(guarantee_circle=True)  # circle of six other institutions; one other lender
    assert rows["J1"]["guarantee_circle"] is True  # bank_a's own contracts form the circle
    assert rows["J2"]["guarantee_circle"] is True


def test_own_overdue_is_not_other(built_default: Settings) -> None:
    settings = built_default
    bank_c = _features(settings, "bank_c")["S7"]
    others = ("bank_a", "bank_b", "bank_d", "bank_e", "bank_f")
    assert bank_c == _expected(other_lender_count=6, other_contract_amount=_sum(contract_amount, others, "S7"),
                               other_loan_balance=_sum(loan_balance, others, "S7"),
                               other_overdue=False, other_nonperforming=True)
    bank_g = _features(settings, "bank_g")["S7"]
    six = ("bank_a", "bank_b", "bank_c", "bank_d", "bank_e", "bank_f")
    assert bank_g["other_contract_amount"] == _sum(contract_amount, six, "S7")
    assert bank_g["other_overdue"] is True


def test_k_two_publishes_small_groups(built_k2: Settings) -> None:
    settings = built_k2
    rows = _features(settings, "bank_a")

    two = ("bank_b", "bank_c")
    assert rows["S3"] == _expected(other_lender_count=2, other_contract_amount=_sum(contract_amount, two, "S3"),
                                   other_loan_balance=_sum(loan_balance, two, "S3"),
                                   other_overdue=True, other_nonperforming=False)
    assert rows["S2"] == _expected()  # one other lender is below k=2 too
    assert rows["C2"]["guarantee_circle"] is True
    assert rows["H1"]["other_lender_count"] is None
    assert rows["A1"]["guarantee_circle"] is None


def test_manifest_describes_features(built_k2: Settings) -> None:
    settings = built_k2
    manifest = json.loads((extract_dir(settings, "bank_a") / "manifest.json").read_text("utf-8"))
    entry = next(table for table in manifest["tables"] if table["name"] == FEATURES_TABLE)

    assert entry["source"] == {"kind": "features", "table": FEATURES_TABLE, "partitions": []}
    assert entry["row_count"] == 8
    assert entry["features"]["min_contributors"] == 2
    assert "少于 2 家" in entry["features"]["columns"]["other_lender_count"]["null_meaning"]
    columns = {column["name"]: column for column in entry["columns"]}
    assert list(columns) == ["KHTYBH", *(column.name for column in FEATURE_COLUMNS)]
    assert columns["KHTYBH"]["treatment"] == "token"
    assert columns["KHTYBH"]["classified"] is True
    assert columns["other_loan_balance"]["class"] == {"level": 3, "pi_category": None, "kind": "amount"}
    assert columns["other_loan_balance"]["treatment"] == "keep"
    assert columns["guarantee_circle"]["type"] == "BOOLEAN"


def test_key_joins_customer_table(built_default: Settings) -> None:
    settings = built_default
    con = duckdb.connect()
    folder = extract_dir(settings, "bank_a")
    features = {row[0] for row in con.sql(f"SELECT KHTYBH FROM read_parquet('{folder / FEATURES_TABLE}.parquet')").fetchall()}
    customers = {row[0] for row in con.sql(f"SELECT KHTYBH FROM read_parquet('{folder}/east_dgkhxxb.parquet')").fetchall()}
    con.close()
    key = open_keystore(settings).current("bank_a", "token").key
    assert features == customers
    assert keyed_token(key, customer_no("bank_a", "S7")) in features


def test_key_kept_when_policy_keeps_it(warehouse, tmp_path: Path) -> None:
    settings = _settings(warehouse, tmp_path)
    build_institution(settings, "bank_a", classes=_classes({(CUSTOMERS, "KHTYBH"): ColumnClass(3, "C1", "customer_no")}))
    rows = _features(settings, "bank_a")
    assert set(rows) == {"S7", "S3", "S2", "A1", "C2", "H1", "J1", "J2"}
    assert rows["S7"]["other_lender_count"] == 6


# --- nothing of another institution ---------------------------------------------------------------------


def _foreign_values(bank: str) -> set[str]:
    """Codes, licence numbers, customer numbers and contract numbers of the other banks, and the certificates
    and names of customers that ``bank`` never reported (as borrower or guarantor)."""
    values: set[str] = set()
    own_rows = [row for rows in _rows(bank).values() for row in rows]
    own = {value for row in own_rows for value in row.values() if value}
    for other in BANKS:
        if other == bank:
            continue
        values.update({other, licence(other), f"{other}-branch"})
        for rows in _rows(other).values():
            for row in rows:
                for field in ("KHTYBH", "HTH", "JJH", "DBHTH", "ZJHM", "KHMC", "DBRZJHM", "DBRMC"):
                    if row.get(field) and row[field] not in own:
                        values.add(row[field])
    return values


def test_no_other_institution_value_in_extract_files(warehouse, tmp_path: Path) -> None:
    settings = _settings(warehouse, tmp_path, k=2)
    # Identifiers kept in clear text, so that one that leaked into the extract would be found as is.
    classes = {(template, column): ColumnClass(2, None, kind)
               for template in (CUSTOMERS, CONTRACTS, LOANS, GUARANTEES)
               for column, kind in (("KHTYBH", "customer_no"), ("ZJHM", "uscc"), ("HTH", "contract_no"),
                                    ("DBRZJHM", "uscc"), ("KHMC", "org_name"), ("JRXKZH", "licence_no"))}
    build_all(settings, classes=_classes(classes))
    foreign = _foreign_values("bank_a")
    assert customer_uscc("G1") in foreign
    assert customer_no("bank_b", "S7") in foreign
    assert "bank_g" in foreign
    assert customer_uscc("C1") not in foreign  # bank_a reported C1 as the guarantor of C2

    con = duckdb.connect()
    for bank in BANKS:
        foreign = _foreign_values(bank)
        files = [path for path in extract_dir(settings, bank).iterdir() if path.is_file()]
        assert f"{FEATURES_TABLE}.parquet" in {path.name for path in files}
        for path in files:
            content = path.read_bytes()
            for value in foreign:
                assert value.encode("utf-8") not in content, (bank, path.name, value)
        # Parquet pages are compressed, so the decoded cells are searched as well.
        for path in files:
            if path.suffix != ".parquet":
                continue
            for row in con.sql(f"SELECT * FROM read_parquet('{path}')").fetchall():
                for cell in row:
                    assert not any(value in str(cell) for value in foreign), (bank, path.name, cell)
    con.close()


def test_no_row_for_customer_of_others(built_k2: Settings) -> None:
    settings = built_k2
    assert "G1" not in _features(settings, "bank_a")
    assert set(_features(settings, "bank_g")) == {"S7", "G1", "H1"}


# --- one computation per run, incremental builds ----------------------------------------------------------


def _computations(caplog: pytest.LogCaptureFixture) -> int:
    return sum("cross-institution features computed" in record.getMessage() for record in caplog.records)


def test_computed_once_per_run_and_rebuilt_on_change(warehouse, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(warehouse, tmp_path)
    caplog.set_level(logging.INFO, logger="extracts.features")
    first = build_all(settings, classes=_classes())
    assert _computations(caplog) == 1
    assert all(outcome.status == "published" for outcome in first.values())

    caplog.clear()
    second = build_all(settings, classes=_classes())
    assert _computations(caplog) == 0
    assert all(outcome.status == "unchanged" for outcome in second.values())

    # bank_e reports S7 overdue in April, so the feature set is computed again. A bank whose feature
    # rows change gets a new feature table and nothing else. The extract of a bank whose rows stay
    # the same is left unchanged.
    before = {code: _features(settings, code) for code in first if code != "bank_e"}
    store = open_keystore(settings)
    loans = _rows("bank_e")[LOANS]
    for row in loans:
        row.update({"CJRQ": "20250430", "DKZT": "02", "YQTS": "10"})
    _load(settings, store, tmp_path, "bank_e", LOANS, loans, 900, date(2025, 4, 30))
    caplog.clear()
    third = build_all(settings, classes=_classes())
    assert _computations(caplog) == 1
    assert _features(settings, "bank_c")["S7"]["other_overdue"] is True
    changed = {code for code in before if _features(settings, code) != before[code]}
    assert "bank_c" in changed
    assert set(before) - changed, "the crafted warehouse must leave some bank's feature rows unchanged"
    for code in before:
        rebuilt = {table.name: table.rebuilt for table in third[code].tables}
        assert not any(value for name, value in rebuilt.items() if name != FEATURES_TABLE)
        assert rebuilt[FEATURES_TABLE] is (code in changed)
        assert third[code].status == ("published" if code in changed else "unchanged")

    # A new k changes every features table and nothing else.
    fourth = build_all(Settings(data_dir=settings.data_dir, extract_feature_min_contributors=2, extract_k_anonymity=1),
                       classes=_classes())
    rebuilt = {table.name: table.rebuilt for table in fourth["bank_a"].tables}
    assert rebuilt[FEATURES_TABLE] is True
    assert not any(value for name, value in rebuilt.items() if name != FEATURES_TABLE)


def test_unreadable_partition_names_no_institution(warehouse, tmp_path: Path) -> None:
    settings = _settings(warehouse, tmp_path)
    partition = next((settings.warehouse_dir / "intake" / LOANS / "institution=bank_f").glob("period=*/part-0.parquet.rssg"))
    data = bytearray(partition.read_bytes())
    data[-40] ^= 0xFF
    partition.write_bytes(bytes(data))

    results = build_all(settings, classes=_classes())
    error = results["bank_a"]
    assert isinstance(error, ExtractSourceError)
    assert error.code == "EXTRACT_FEATURE_PARTITION_UNREADABLE"
    assert "bank_f" not in error.message
    assert not extract_dir(settings, "bank_a").exists()


def test_k_below_two_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extract_feature_min_contributors"):
        Settings(data_dir=tmp_path, extract_feature_min_contributors=1)


def test_warehouse_without_guarantees(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    settings = Settings(data_dir=data_dir, extract_feature_min_contributors=2)
    store = ensure_platform_keys(settings, ["bank_a", "bank_b", "bank_c"], on_event=None)
    approve_shipped_policy(settings)
    for number, bank in enumerate(("bank_a", "bank_b", "bank_c")):
        rows = _rows(bank)
        _load(settings, store, tmp_path, bank, CUSTOMERS, rows[CUSTOMERS], 10 + number)
        _load(settings, store, tmp_path, bank, LOANS, rows[LOANS], 20 + number)
    build_all(settings, classes=_classes())

    rows = _features(settings, "bank_a")
    two = ("bank_b", "bank_c")
    assert rows["S7"] == _expected(other_lender_count=2, other_contract_amount=Decimal(0),
                                   other_loan_balance=_sum(loan_balance, two, "S7"),
                                   other_overdue=True, other_nonperforming=False)
    assert all(row["guarantee_circle"] is None for row in rows.values())
