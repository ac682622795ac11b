"""Watermarks of the masked extracts: both layers, the registry, identification of re-exported files and the CLI."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from extracts import watermark as watermark_module
from extracts.builder import build_institution, extract_dir
from extracts.demo_data import DEMO_INSTITUTIONS
from extracts.warehouse import read_partition
from extracts.watermark import (
    METADATA_KEY,
    BuildWatermark,
    KeyedBits,
    WatermarkKeyMissing,
    WatermarkRegistryInvalid,
    binomial_tail,
    carrier_parity,
    identify_file,
    register_build,
    registry_dir,
)
from regsandbox_core.crypto import sm3_file
from regsandbox_core.keystore import KeyVersion
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings
from tests.extracts.conftest import masked_demo
from tests.extracts.test_masked_intake import CLASSES, FEBRUARY, LOAN_FIELDS, LOANS, _load, _loan, warehouse  # noqa: F401

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TABLE = "applications.parquet"


def _manifest(settings: Settings, code: str) -> dict:
    return json.loads((extract_dir(settings, code) / "manifest.json").read_text(encoding="utf-8"))


def _extract(settings: Settings, code: str) -> pl.DataFrame:
    return pl.read_parquet(extract_dir(settings, code) / TABLE)


def _identify(settings: Settings, path: Path):
    return identify_file(settings, open_keystore(settings), path)


def _run_cli(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(settings.data_dir)}
    return subprocess.run([sys.executable, "-m", "extracts", *arguments], cwd=PROJECT_ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def _unmarked_csv(settings: Settings, code: str, path: Path) -> Path:
    """Write the institution's rows masked like its extract but without the data mark."""
    store = open_keystore(settings)
    masked_demo(read_partition(settings, store, code), store.current(code, "token").key).write_csv(path)
    return path


# --- what a build records ---------------------------------------------------------------------------


def test_manifest_declares_watermark(demo_settings: Settings) -> None:
    manifest = _manifest(demo_settings, "bank_a")
    watermark_id = manifest["watermark"]["id"]
    assert re.fullmatch(r"wm1-[0-9a-f]{16}", watermark_id)
    assert manifest["watermark"]["scheme"] == "regsandbox-watermark/1"
    (table,) = manifest["tables"]
    assert table["watermark"] == {"id": watermark_id, "key_column": "id_number", "carrier": "credit_amount",
                                  "scale": 0, "max_change": "1"}
    metadata = pq.read_schema(extract_dir(demo_settings, "bank_a") / TABLE).metadata
    assert json.loads(metadata[METADATA_KEY.encode()]) == {"scheme": "regsandbox-watermark/1", "id": watermark_id,
                                                           "table": "applications"}


def test_watermark_ids_differ_per_institution(demo_settings: Settings) -> None:
    ids = {_manifest(demo_settings, code)["watermark"]["id"] for code in DEMO_INSTITUTIONS}
    assert len(ids) == len(DEMO_INSTITUTIONS)


def test_registry_maps_id_to_build(demo_settings: Settings) -> None:
    manifest = _manifest(demo_settings, "bank_b")
    path = registry_dir(demo_settings) / "bank_b.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    (entry,) = [item for item in document["builds"] if item["watermark_id"] == manifest["watermark"]["id"]]
    assert entry["institution"] == "bank_b"
    assert entry["build_id"] == manifest["build_id"]
    assert entry["built_at"] == manifest["built_at"]
    assert entry["key"] == "platform/token/v1"
    assert entry["tables"] == [{"name": "applications", "file": TABLE, "sm3": manifest["tables"][0]["sm3"],
                                "rows": 333, "watermark": manifest["tables"][0]["watermark"]}]
    assert entry["tables"][0]["sm3"] == sm3_file(extract_dir(demo_settings, "bank_b") / TABLE)


def test_registry_private_to_platform(demo_settings: Settings) -> None:
    folder = registry_dir(demo_settings)
    assert folder.parent == demo_settings.warehouse_dir
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(path.name for path in folder.iterdir()) == [f"{code}.json" for code in DEMO_INSTITUTIONS]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    # Nothing of the registry is published with the extracts that sandboxes read.
    for path in demo_settings.extracts_dir.rglob("*"):
        assert "watermarks" not in path.parts, path


# --- distortion -------------------------------------------------------------------------------------


def test_carrier_moves_at_most_one_unit(demo_settings: Settings) -> None:
    store = open_keystore(demo_settings)
    raw = read_partition(demo_settings, store, "bank_a")
    expected = masked_demo(raw, store.current("bank_a", "token").key).sort("application_id")
    extract = _extract(demo_settings, "bank_a").sort("application_id")

    assert extract.drop("credit_amount").equals(expected.drop("credit_amount"))
    marked, original = extract["credit_amount"].to_list(), expected["credit_amount"].to_list()
    differences = [after - before for after, before in zip(marked, original)]
    assert set(differences) <= {-1, 0, 1}
    assert all(after // 2 == before // 2 for after, before in zip(marked, original))
    changed = sum(1 for difference in differences if difference)
    assert 0.3 < changed / len(differences) < 0.7, changed
    assert abs(sum(differences) / len(differences)) < 0.2


# --- identification ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", DEMO_INSTITUTIONS)
def test_identify_original_file(demo_settings: Settings, code: str) -> None:
    manifest = _manifest(demo_settings, code)
    result = _identify(demo_settings, extract_dir(demo_settings, code) / TABLE)
    assert result.file_format == "parquet"
    assert result.metadata_id == manifest["watermark"]["id"]
    assert result.institution == code
    assert result.build is not None and result.build["build_id"] == manifest["build_id"]
    assert result.institution_score is not None and result.institution_score.rate == 1.0
    assert result.build_score is not None and result.build_score.rate == 1.0
    assert result.published_in == (manifest["build_id"],)
    assert result.conflict is False


def test_identify_csv_without_metadata(demo_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "leaked.csv"
    _extract(demo_settings, "bank_a").write_csv(path)
    result = _identify(demo_settings, path)
    assert result.file_format == "csv"
    assert result.metadata_id is None
    assert result.institution == "bank_a"
    assert result.build is not None and result.build["build_id"] == _manifest(demo_settings, "bank_a")["build_id"]
    assert result.institution_score is not None
    assert result.institution_score.rate == 1.0
    assert result.institution_score.chance < 1e-20


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_identify_subset_with_reordered_columns(demo_settings: Settings, tmp_path: Path, suffix: str) -> None:
    frame = _extract(demo_settings, "bank_c")
    subset = frame.sample(fraction=0.3, seed=7)
    subset = subset.select(list(reversed(subset.columns)))
    path = tmp_path / f"subset.{suffix}"
    if suffix == "csv":
        subset.write_csv(path)
    else:
        pq.write_table(subset.to_arrow(), path)  # another writer: no regsandbox metadata
    assert subset.height == 99

    result = _identify(demo_settings, path)
    assert result.metadata_id is None
    assert result.institution == "bank_c"
    assert result.build is not None and result.build["build_id"] == _manifest(demo_settings, "bank_c")["build_id"]
    assert result.institution_score is not None and result.institution_score.significant


def test_identify_gbk_csv_with_float_amounts(demo_settings: Settings, tmp_path: Path) -> None:
    frame = _extract(demo_settings, "bank_a").to_pandas()
    frame["credit_amount"] = frame["credit_amount"].astype(float)  # written as 2096.0
    path = tmp_path / "excel.csv"
    frame.to_csv(path, index=False, encoding="gbk")
    assert "张" in frame["name"].str.cat()
    result = _identify(demo_settings, path)
    assert result.institution == "bank_a"
    assert result.institution_score is not None and result.institution_score.rate == 1.0


def test_other_institution_named(demo_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "from_b.csv"
    _extract(demo_settings, "bank_b").sample(fraction=0.3, seed=3).write_csv(path)
    result = _identify(demo_settings, path)
    assert result.institution == "bank_b"
    assert result.build is not None and result.build["institution"] == "bank_b"


def test_unmarked_file_unknown(demo_settings: Settings, tmp_path: Path) -> None:
    result = _identify(demo_settings, _unmarked_csv(demo_settings, "bank_a", tmp_path / "unmarked.csv"))
    assert result.institution is None
    assert result.build is None
    assert result.institution_score is not None
    assert not result.institution_score.significant
    assert result.institution_score.rate < 0.7


def test_unrelated_file_unknown(demo_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).write_csv(path)
    result = _identify(demo_settings, path)
    assert result.institution is None
    assert result.institution_score is None


def test_metadata_conflict_trusts_data(demo_settings: Settings, tmp_path: Path) -> None:
    table = pq.read_table(extract_dir(demo_settings, "bank_b") / TABLE)
    forged = table.replace_schema_metadata({METADATA_KEY: json.dumps({"id": _manifest(demo_settings, "bank_a")["watermark"]["id"]})})
    path = tmp_path / "forged.parquet"
    pq.write_table(forged, path)
    result = _identify(demo_settings, path)
    assert result.metadata_build is not None and result.metadata_build["institution"] == "bank_a"
    assert result.institution == "bank_b"
    assert result.conflict is True


def test_binomial_tail_exact() -> None:
    assert binomial_tail(3, 3) == 1 / 8
    assert binomial_tail(2, 3) == 4 / 8
    assert binomial_tail(0, 5) == 1.0
    assert binomial_tail(50, 50) == 2.0 ** -50


# --- incremental builds -----------------------------------------------------------------------------


def test_reused_table_keeps_origin_mark(fresh_settings: Settings, tmp_path: Path) -> None:
    first = build_institution(fresh_settings, "bank_c")
    first_manifest = _manifest(fresh_settings, "bank_c")
    # A build folder whose mode differs from the wanted one makes the next build publish again,
    # while its unchanged table is hard-linked.
    os.chmod(first.folder, 0o750)
    second = build_institution(fresh_settings, "bank_c")
    second_manifest = _manifest(fresh_settings, "bank_c")

    assert second.status == "published"
    assert second.build_id != first.build_id
    assert [table.rebuilt for table in second.tables] == [False]
    assert second_manifest["watermark"]["id"] != first_manifest["watermark"]["id"]
    assert second_manifest["tables"][0]["watermark"]["id"] == first_manifest["watermark"]["id"]

    path = tmp_path / "reused.csv"
    _extract(fresh_settings, "bank_c").write_csv(path)
    result = _identify(fresh_settings, path)
    assert result.institution == "bank_c"
    assert result.build is not None and result.build["build_id"] == first.build_id
    assert result.published_in == (first.build_id, second.build_id)


def test_rotated_key_still_identifies(fresh_settings: Settings, tmp_path: Path) -> None:
    first = build_institution(fresh_settings, "bank_a")
    path = tmp_path / "before-rotation.csv"
    _extract(fresh_settings, "bank_a").write_csv(path)
    store = open_keystore(fresh_settings)
    assert store.rotate("platform", "token") == 2
    os.chmod(first.folder, 0o750)  # publish again, reusing the table marked under v1
    second = build_institution(fresh_settings, "bank_a")
    entries = json.loads((registry_dir(fresh_settings) / "bank_a.json").read_text(encoding="utf-8"))["builds"]

    assert [entry["key"] for entry in entries] == ["platform/token/v1", "platform/token/v2"]
    assert second.status == "published"
    result = _identify(fresh_settings, path)
    assert result.institution == "bank_a"
    assert result.build is not None and result.build["build_id"] == first.build_id


def _metadata_id(path: Path) -> str:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY.encode()])["id"]


def test_intake_tables_carry_their_ids(warehouse, tmp_path: Path) -> None:
    settings, store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    first_id = _manifest(settings, "bank_a")["watermark"]["id"]
    # A second period of loans: the loan table is merged from the previous one, the customers are reused.
    _load(settings, store, tmp_path, "bank_a", LOANS, LOAN_FIELDS, [_loan("bank_a", 7, "77")], FEBRUARY, 90)
    second = build_institution(settings, "bank_a", classes=CLASSES)
    manifest = _manifest(settings, "bank_a")
    tables = {table["name"]: table for table in manifest["tables"]}
    folder = extract_dir(settings, "bank_a")

    assert second.build_id != first.build_id
    assert {table.name: table.periods_rebuilt for table in second.tables} == {"test_khxx": (), "test_dkxx": ("20250228",)}
    assert tables["test_khxx"]["watermark"] == {"id": first_id, "carrier": None,
                                                "note": "表中没有可承载数据内嵌水印的金额列，仅在 Parquet 元数据中标记"}
    assert _metadata_id(folder / "test_khxx.parquet") == first_id
    assert tables["test_dkxx"]["watermark"]["id"] == manifest["watermark"]["id"]
    assert tables["test_dkxx"]["watermark"]["carrier"] == "YE"
    assert _metadata_id(folder / "test_dkxx.parquet") == manifest["watermark"]["id"]
    result = _identify(settings, folder / "test_khxx.parquet")
    assert result.institution == "bank_a"
    assert result.build is not None and result.build["build_id"] == first.build_id


def test_full_build_marks_while_masking(warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _store, _raw = warehouse
    rewrites: list[Path] = []
    original = watermark_module._rewrite

    def counting_rewrite(con, path, query, metadata):
        rewrites.append(path)
        return original(con, path, query, metadata)

    monkeypatch.setattr(watermark_module, "_rewrite", counting_rewrite)
    build_institution(settings, "bank_a", classes=CLASSES)
    manifest = _manifest(settings, "bank_a")
    loans = next(table for table in manifest["tables"] if table["name"] == "test_dkxx")
    folder = extract_dir(settings, "bank_a")

    # The loan table (token ZJHM, kept amount YE) got its data mark in the masking COPY.
    assert loans["watermark"] == {"id": manifest["watermark"]["id"], "key_column": "ZJHM", "carrier": "YE",
                                  "scale": 2, "max_change": "0.01"}
    assert rewrites == []
    assert sm3_file(folder / "test_dkxx.parquet") == loans["sm3"]
    bits = KeyedBits(open_keystore(settings).current("platform", "token"))
    marked = pl.read_parquet(folder / "test_dkxx.parquet")
    assert marked.height == 6
    for token, balance in zip(marked["ZJHM"].to_list(), marked["YE"].to_list()):
        assert carrier_parity(balance, 2) == bits.bit("bank_a", manifest["watermark"]["id"], token), (token, balance)
    result = _identify(settings, folder / "test_dkxx.parquet")
    assert result.institution == "bank_a"
    assert result.build is not None and result.build["build_id"] == manifest["build_id"]


def _loan_table(path: Path, carrier_type: str) -> tuple[list[dict], list[str]]:
    """Write 600 loan rows with a text, decimal or integer balance and return their column entries and balances."""
    balances = [f"{10000 + number * 37}.{number % 100:02d}" for number in range(600)]
    frame = pl.DataFrame({
        "HTH": [f"HT{number:05d}" for number in range(600)],
        "ZJHM": [f"{number * 7919:064x}" for number in range(600)],
        "YE": balances,
    })
    if carrier_type == "decimal":
        frame = frame.with_columns(pl.col("YE").cast(pl.Decimal(18, 2)))
    elif carrier_type == "integer":
        frame = frame.with_columns(pl.col("YE").str.split(".").list.first().cast(pl.Int64))
    frame.write_parquet(path)
    columns = [{"name": "HTH", "treatment": "keep", "class": {"level": 2, "pi_category": None, "kind": "contract_no"}},
               {"name": "ZJHM", "treatment": "token", "class": {"level": 3, "pi_category": "C2", "kind": "resident_id"}},
               {"name": "YE", "treatment": "keep", "class": {"level": 2, "pi_category": "C1", "kind": "amount"}}]
    return columns, [str(value) for value in frame["YE"].to_list()]


def _register(settings: Settings, watermark: BuildWatermark, path: Path, entry: dict) -> None:
    manifest = {"built_at": "2026-12-05T00:00:00+00:00",
                "tables": [{"name": "loans", "file": path.name, "sm3": sm3_file(path), "row_count": 600, "watermark": entry}]}
    register_build(settings, watermark, manifest)


@pytest.mark.parametrize(("carrier_type", "scale"), [("text", 2), ("decimal", 2), ("integer", 0)])
def test_marking_again_replaces_mark(fresh_settings: Settings, tmp_path: Path, carrier_type: str, scale: int) -> None:
    path = tmp_path / "loans.parquet"
    columns, original = _loan_table(path, carrier_type)
    key = open_keystore(fresh_settings).current("platform", "token")
    first = BuildWatermark.new("bank_a", "build-1", key)
    _register(fresh_settings, first, path, first.mark_table(path, "loans", columns))
    # A table merged from the previous build and new periods is marked again as a whole.
    second = BuildWatermark.new("bank_a", "build-2", key)
    entry = second.mark_table(path, "loans", columns)
    _register(fresh_settings, second, path, entry)

    assert entry == {"id": second.id, "key_column": "ZJHM", "carrier": "YE", "scale": scale,
                     "max_change": "0.01" if scale else "1"}
    marked = pl.read_parquet(path).sort("HTH")
    unit = Decimal(1).scaleb(-scale)
    values = [str(value) for value in marked["YE"].to_list()]
    for before, after in zip(original, values):
        assert abs(Decimal(after) - Decimal(before)) <= unit, (before, after)
        assert len(after) == len(before), (before, after)
    assert values != original

    csv = tmp_path / "loans.csv"
    marked.select("YE", "ZJHM").write_csv(csv)
    result = _identify(fresh_settings, csv)
    assert result.institution == "bank_a"
    assert result.build is not None and result.build["build_id"] == "build-2"
    assert result.build_score is not None and result.build_score.rate == 1.0


def test_small_amounts_carry_metadata_only(fresh_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "small.parquet"
    frame = pl.DataFrame({"ZJHM": [f"{number:064x}" for number in range(200)], "YE": [number % 50 for number in range(200)]})
    frame.write_parquet(path)
    columns = [{"name": "ZJHM", "treatment": "token", "class": {"kind": "resident_id"}},
               {"name": "YE", "treatment": "keep", "class": {"kind": "amount"}}]
    watermark = BuildWatermark.new("bank_a", "build-1", open_keystore(fresh_settings).current("platform", "token"))

    entry = watermark.mark_table(path, "small", columns)

    assert entry["id"] == watermark.id
    assert entry["carrier"] is None
    assert pl.read_parquet(path).equals(frame)
    assert json.loads(pq.read_schema(path).metadata[METADATA_KEY.encode()])["id"] == watermark.id


# --- failures ---------------------------------------------------------------------------------------


def test_revoked_watermark_key_blocks_build(fresh_settings: Settings) -> None:
    open_keystore(fresh_settings).revoke("platform", "token", 1, reason="test")
    with pytest.raises(WatermarkKeyMissing) as caught:
        build_institution(fresh_settings, "bank_a")
    assert caught.value.code == "WATERMARK_KEY_MISSING"
    assert "platform/token" in caught.value.message
    assert "regsandbox init" in caught.value.message
    assert not extract_dir(fresh_settings, "bank_a").exists()


def test_unreadable_registry_blocks_publication(fresh_settings: Settings) -> None:
    path = registry_dir(fresh_settings) / "bank_a.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(WatermarkRegistryInvalid) as caught:
        build_institution(fresh_settings, "bank_a")
    assert caught.value.code == "WATERMARK_REGISTRY_INVALID"
    assert str(path) in caught.value.message
    assert not extract_dir(fresh_settings, "bank_a").exists()
    assert list((fresh_settings.extracts_dir / "bank_a.builds").iterdir()) == []
    assert path.read_text(encoding="utf-8") == "{not json"


# --- command ----------------------------------------------------------------------------------------


def test_cli_names_source_of_csv(demo_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "leaked.csv"
    _extract(demo_settings, "bank_b").sample(fraction=0.3, seed=5).write_csv(path)
    result = _run_cli(demo_settings, "identify", str(path))
    manifest = _manifest(demo_settings, "bank_b")
    assert result.returncode == 0, result.stderr
    assert "Parquet 元数据水印：无（CSV 文件不含元数据）" in result.stdout
    assert f"结论：来源为机构 bank_b，构建编号 {manifest['build_id']}，构建时间 {manifest['built_at']}" in result.stdout
    assert "偶然达到此吻合度的概率约为" in result.stdout


def test_cli_reports_unmarked_file(demo_settings: Settings, tmp_path: Path) -> None:
    result = _run_cli(demo_settings, "identify", str(_unmarked_csv(demo_settings, "bank_c", tmp_path / "plain.csv")))
    assert result.returncode == 3, result.stderr
    assert "结论：未发现本平台的水印，无法确定来源。" in result.stdout


def test_cli_missing_file(demo_settings: Settings, tmp_path: Path) -> None:
    result = _run_cli(demo_settings, "identify", str(tmp_path / "absent.parquet"))
    assert result.returncode == 2
    assert "IDENTIFY_FILE_NOT_FOUND" in result.stderr
    assert "absent.parquet" in result.stderr
    assert "Traceback" not in result.stderr


def test_bits_of_many_keys_match_bit() -> None:
    key = KeyVersion("platform", "token", 1, bytes(range(32)))
    bits = KeyedBits(key)
    values = ["", "a", "甲乙", "0" * 32, "3f" * 16, *(f"{number:032x}" for number in range(200))]

    many = bits.bits("bank_a", "wm1-0123456789abcdef", [value.encode("utf-8") for value in values])

    assert list(many) == [bits.bit("bank_a", "wm1-0123456789abcdef", value) for value in values]
    assert set(many) == {0, 1}
