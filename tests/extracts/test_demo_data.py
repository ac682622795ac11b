"""The demo warehouse: real German credit rows, synthetic Chinese identifiers, deterministic split."""

from __future__ import annotations

import stat

import polars as pl
import pytest
from stdnum.cn import ric

from extracts.demo_data import (
    DEMO_INSTITUTIONS,
    DEMO_REFERENCE_DATE,
    build_demo_frame,
    check_resident_id,
    load_demo,
)
from extracts.warehouse import (
    plaintext_partition_file,
    read_partition,
    read_partition_bytes,
    warehouse_institutions,
    warehouse_partition_file,
)
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings


@pytest.fixture(scope="module")
def demo_frame() -> pl.DataFrame:
    return build_demo_frame()


def _age_on_reference_date(id_number: str) -> int:
    birth = ric.get_birth_date(id_number)
    before_birthday = (DEMO_REFERENCE_DATE.month, DEMO_REFERENCE_DATE.day) < (birth.month, birth.day)
    return DEMO_REFERENCE_DATE.year - birth.year - before_birthday


def _persons_at_one_row(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("id_number").is_unique())


def test_target_is_zero_one_with_bad_as_one(demo_frame: pl.DataFrame) -> None:
    assert demo_frame.height == 1000
    assert demo_frame["creditability"].dtype == pl.Int64
    assert set(demo_frame["creditability"].unique().to_list()) == {0, 1}
    # germancredit.csv contains 300 bad and 700 good applications.
    assert demo_frame["creditability"].sum() == 300


def test_rows_split_by_index_modulo_three(demo_frame: pl.DataFrame) -> None:
    expected = [DEMO_INSTITUTIONS[index % 3] for index in range(1000)]
    assert demo_frame["institution"].to_list() == expected
    counts = dict(demo_frame.group_by("institution").len().iter_rows())
    assert counts == {"bank_a": 334, "bank_b": 333, "bank_c": 333}


def test_application_ids_unique_and_stable(demo_frame: pl.DataFrame) -> None:
    assert demo_frame["application_id"].n_unique() == 1000
    assert demo_frame["application_id"][0] == "APP000001"
    assert demo_frame["application_id"][999] == "APP001000"


def test_resident_ids_have_valid_check_digit(demo_frame: pl.DataFrame) -> None:
    for id_number in demo_frame["id_number"].unique().to_list():
        assert len(id_number) == 18, id_number
        assert id_number[:17].isdigit(), id_number
        assert ric.calc_check_digit(id_number) == id_number[-1], id_number
        # Raises for a wrong length, format, check digit or birth date; False only when the birth-place check fails.
        check_resident_id(id_number)


def test_resident_ids_match_age_and_sex(demo_frame: pl.DataFrame) -> None:
    single = _persons_at_one_row(demo_frame)
    for id_number, age, status in single.select("id_number", "age_in_years", "personal_status_and_sex").iter_rows():
        assert _age_on_reference_date(id_number) == age, id_number
        male = status.startswith("male")
        assert int(id_number[16]) % 2 == (1 if male else 0), (id_number, status)


def test_mobiles_are_chinese_mobile_numbers(demo_frame: pl.DataFrame) -> None:
    for mobile in demo_frame["mobile"].to_list():
        assert len(mobile) == 11, mobile
        assert mobile.isdigit(), mobile
        assert mobile.startswith("1"), mobile


def test_names_are_chinese(demo_frame: pl.DataFrame) -> None:
    for name in demo_frame["name"].to_list():
        assert 2 <= len(name) <= 4, name
        assert all("\u4e00" <= character <= "\u9fff" for character in name), name


def test_one_in_nine_persons_at_two_institutions(demo_frame: pl.DataFrame) -> None:
    persons = demo_frame.group_by("id_number").agg(
        pl.col("institution").n_unique().alias("institutions"),
        pl.len().alias("rows"),
        pl.col("name").n_unique().alias("names"),
        pl.col("mobile").n_unique().alias("mobiles"),
    )
    assert persons.height == 900
    assert persons.filter(pl.col("institutions") == 2).height == 100
    assert persons["rows"].max() == 2
    # A person who reapplies does so at another institution, with the same name and mobile.
    assert persons.filter(pl.col("rows") == 2)["institutions"].min() == 2
    assert persons["names"].max() == 1
    assert persons["mobiles"].max() == 1
    assert demo_frame["mobile"].n_unique() == 900


def test_demo_frame_is_deterministic(demo_frame: pl.DataFrame) -> None:
    assert build_demo_frame().equals(demo_frame)


def test_different_seed_changes_identifiers(demo_frame: pl.DataFrame) -> None:
    other = build_demo_frame(seed=7)
    assert other["id_number"].to_list() != demo_frame["id_number"].to_list()
    assert other["creditability"].to_list() == demo_frame["creditability"].to_list()


def test_warehouse_partitions_private(demo_settings: Settings) -> None:
    assert warehouse_institutions(demo_settings) == list(DEMO_INSTITUTIONS)
    store = open_keystore(demo_settings)
    total = 0
    for code in DEMO_INSTITUTIONS:
        path = warehouse_partition_file(demo_settings, code)
        partition_dir = demo_settings.data_dir / "warehouse" / "applications" / f"institution={code}"
        assert path == partition_dir / "part-0.parquet.rssg"
        assert sorted(entry.name for entry in partition_dir.iterdir()) == ["part-0.parquet.rssg"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for folder in (path.parent, path.parent.parent, demo_settings.warehouse_dir):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        part = read_partition(demo_settings, store, code)
        assert "institution" not in part.columns
        assert {"name", "id_number", "mobile", "application_id", "creditability"} <= set(part.columns)
        total += part.height
    assert total == 1000


def test_load_demo_twice_leaves_no_temp_files(tmp_path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o711)
    settings = Settings(data_dir=data_dir)
    first = load_demo(settings)
    store = open_keystore(settings)
    before = read_partition_bytes(settings, store, "bank_a")
    second = load_demo(settings)
    assert first == second == {"bank_a": 334, "bank_b": 333, "bank_c": 333}
    assert read_partition_bytes(settings, store, "bank_a") == before
    leftovers = [path for path in settings.warehouse_dir.rglob("*") if path.name.startswith(".")]
    assert leftovers == []
    # The data dir itself belongs to `regsandbox init`; loading demo data keeps its mode.
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o711



def test_load_demo_creates_institution_data_keys(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    load_demo(settings)
    store = open_keystore(settings)
    for code in DEMO_INSTITUTIONS:
        assert store.current(code, "data").version == 1
        assert read_partition_bytes(settings, store, code).startswith(b"PAR1")


def test_load_demo_replaces_plaintext_partition(tmp_path, demo_settings: Settings) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    load_demo(settings)
    plaintext = plaintext_partition_file(settings, "bank_b")
    plaintext.write_bytes(read_partition_bytes(demo_settings, open_keystore(demo_settings), "bank_b"))

    load_demo(settings)

    assert not plaintext.exists()
    assert warehouse_partition_file(settings, "bank_b").is_file()
    assert warehouse_institutions(settings) == list(DEMO_INSTITUTIONS)
