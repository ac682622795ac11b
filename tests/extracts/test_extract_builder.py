"""Masked extracts built from the real demo data: content, tokens, manifest, files and the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import extracts.builder
import extracts.policy
from extracts.builder import (
    ExtractWriteFailed,
    InvalidInstitutionError,
    WarehouseMissingError,
    build_all,
    build_extract,
    extract_dir,
)
from extracts.demo_data import DEMO_INSTITUTIONS
from extracts.policy import DEFAULT_POLICY_FILE, PolicyNotApproved, approve_policy
from extracts.warehouse import read_partition
from tests.extracts.conftest import masked_demo, watermarked
from regsandbox_core.crypto import keyed_token, sm3_file
from regsandbox_core.platform_keys import ensure_platform_keys, open_keystore
from regsandbox_core.settings import Settings
from tests.extract_setup import approve_shipped_policy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
IDENTIFIERS = ("name", "id_number", "mobile")


def _extract(settings: Settings, code: str) -> pl.DataFrame:
    return pl.read_parquet(extract_dir(settings, code) / "applications.parquet")


def _warehouse(settings: Settings, code: str) -> pl.DataFrame:
    return read_partition(settings, open_keystore(settings), code)


def _all_raw_identifiers(settings: Settings) -> set[str]:
    values: set[str] = set()
    for code in DEMO_INSTITUTIONS:
        raw = _warehouse(settings, code)
        for column in ("name", "id_number", "mobile"):
            values.update(raw[column].to_list())
    return values


def _run_cli(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(settings.data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "extracts", *arguments],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_row_counts_sum_to_thousand(demo_settings: Settings) -> None:
    counts = {code: _extract(demo_settings, code).height for code in DEMO_INSTITUTIONS}
    assert counts == {"bank_a": 334, "bank_b": 333, "bank_c": 333}
    assert sum(counts.values()) == 1000


def test_extract_columns_mask_identifiers(demo_settings: Settings) -> None:
    frame = _extract(demo_settings, "bank_a")
    assert frame.columns == _warehouse(demo_settings, "bank_a").columns
    assert frame["creditability"].sum() > 0
    for token in frame["id_number"].to_list():
        assert len(token) == 32 and all(character in "0123456789abcdef" for character in token)
    for name in frame["name"].to_list():
        surname = name.rstrip("*")
        assert len(surname) in (1, 2) and len(name) > len(surname), name
    for mobile in frame["mobile"].to_list():
        assert len(mobile) == 11 and mobile[3:7] == "****" and mobile[:3].isdigit() and mobile[7:].isdigit(), mobile


@pytest.mark.parametrize("code", DEMO_INSTITUTIONS)
def test_no_raw_identifier_in_bytes(demo_settings: Settings, code: str) -> None:
    identifiers = _all_raw_identifiers(demo_settings)
    folder = extract_dir(demo_settings, code)
    for path in folder.iterdir():
        content = path.read_bytes()
        for value in identifiers:
            assert value.encode("utf-8") not in content, (path.name, value)


@pytest.mark.parametrize("code", DEMO_INSTITUTIONS)
def test_no_raw_identifier_in_values(demo_settings: Settings, code: str) -> None:
    identifiers = _all_raw_identifiers(demo_settings)
    frame = _extract(demo_settings, code)
    for column in frame.columns:
        if frame[column].dtype != pl.String:
            continue
        leaked = set(frame[column].to_list()) & identifiers
        assert leaked == set(), column
        # Substrings too: a raw ID or mobile inside a longer text is still a leak.
        long_identifiers = [value for value in identifiers if len(value) >= 11]
        for text in frame[column].unique().to_list():
            assert not any(value in text for value in long_identifiers), (column, text)


def test_tokens_are_hmac_sm3_of_identifiers(demo_settings: Settings) -> None:
    key = open_keystore(demo_settings).current("bank_b", "token").key
    # Masked rows are not in warehouse order (the token join reorders them), so both sides are sorted.
    raw = _warehouse(demo_settings, "bank_b").sort("application_id")
    extract = _extract(demo_settings, "bank_b").sort("application_id")
    assert extract.height == 333
    assert extract["id_number"].to_list() == [keyed_token(key, value) for value in raw["id_number"].to_list()]
    assert extract.equals(watermarked(masked_demo(raw, key), demo_settings, extract_dir(demo_settings, "bank_b")))


def test_same_person_same_token_within_institution(fresh_settings: Settings) -> None:
    build_extract(fresh_settings, "bank_a")
    first = _extract(fresh_settings, "bank_a")
    build_extract(fresh_settings, "bank_a")
    second = _extract(fresh_settings, "bank_a")
    columns = ("application_id", "id_number")
    assert first.select(columns).sort("application_id").equals(second.select(columns).sort("application_id"))


def test_shared_persons_unlinkable_across_institutions(demo_settings: Settings) -> None:
    raw = pl.concat([_warehouse(demo_settings, code) for code in DEMO_INSTITUTIONS])
    masked = pl.concat([_extract(demo_settings, code) for code in DEMO_INSTITUTIONS], how="diagonal")
    persons = raw.select("application_id", pl.col("id_number").alias("raw_id")).join(masked, on="application_id")
    assert persons.height == 1000

    shared = persons.filter(pl.col("raw_id").is_duplicated())
    assert shared["raw_id"].n_unique() == 100
    for raw_id, group in shared.group_by("raw_id"):
        assert group["id_number"].n_unique() == 2, raw_id


def test_token_sets_disjoint_across_institutions(demo_settings: Settings) -> None:
    seen: dict[str, str] = {}
    for code in DEMO_INSTITUTIONS:
        for token in set(_extract(demo_settings, code)["id_number"].to_list()):
            assert token not in seen, (code, seen.get(token))
            seen[token] = code


def test_manifest_matches_files(demo_settings: Settings) -> None:
    for code in DEMO_INSTITUTIONS:
        folder = extract_dir(demo_settings, code)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["institution"] == code
        assert manifest["token_key_version"] == 1
        assert manifest["token_key"] == f"{code}/token/v1"
        assert manifest["built_at"].endswith("+00:00")
        assert manifest["format"] == "regsandbox-extract/2"
        assert manifest["policy"]["version"] == 1
        assert manifest["policy"]["signature_key"] == "platform/signing/v1"
        assert manifest["key_versions"] == {"token": f"{code}/token/v1", "signing": "platform/signing/v1",
                                            "data": [f"{code}/data/v1"]}

        (table,) = manifest["tables"]
        frame = pl.read_parquet(folder / table["file"])
        assert table["name"] == "applications"
        assert table["file"] == "applications.parquet"
        assert table["row_count"] == frame.height
        assert table["sm3"] == sm3_file(folder / table["file"])
        assert table["size"] == (folder / table["file"]).stat().st_size
        assert [column["name"] for column in table["columns"]] == frame.columns
        assert table["dropped_columns"] == []
        columns = {column["name"]: column for column in table["columns"]}
        assert columns["id_number"]["type"] == "VARCHAR"
        assert columns["creditability"]["type"] == "BIGINT"
        assert [columns[name]["treatment"] for name in IDENTIFIERS] == ["partial_mask", "token", "partial_mask"]
        assert columns["id_number"]["class"] == {"level": 3, "pi_category": "C2", "kind": "resident_id"}
        assert columns["credit_amount"]["treatment"] == "keep"
        assert table["source"]["kind"] == "demo"


def test_rebuild_is_idempotent(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_c")
    table_bytes = (folder / "applications.parquet").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))

    real = os.path.realpath(folder)
    assert build_extract(fresh_settings, "bank_c") == folder
    assert os.path.realpath(folder) == real
    rebuilt = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert (folder / "applications.parquet").read_bytes() == table_bytes
    assert rebuilt["tables"] == manifest["tables"]
    assert sorted(path.name for path in folder.iterdir()) == ["applications.parquet", "manifest.json", "manifest.json.sig"]


def test_build_all_verifies_policy_once(fresh_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    verified_paths: list[Path] = []
    verify = extracts.policy.verified_policy

    def counting_verify(path: Path, keystore: object) -> object:
        verified_paths.append(path)
        return verify(path, keystore)

    monkeypatch.setattr(extracts.policy, "verified_policy", counting_verify)
    monkeypatch.setattr(extracts.builder, "verified_policy", counting_verify)
    results = build_all(fresh_settings)

    assert sorted(results) == sorted(DEMO_INSTITUTIONS)
    assert {code: getattr(outcome, "status", outcome) for code, outcome in results.items()} == {
        code: "published" for code in DEMO_INSTITUTIONS}
    assert len(verified_paths) == 1


def test_build_all_rejects_tampered_policy(fresh_settings: Settings) -> None:
    policy = approve_policy(fresh_settings, open_keystore(fresh_settings), DEFAULT_POLICY_FILE)
    policy.path.write_text(policy.path.read_text("utf-8").replace("treatment: partial_mask", "treatment: keep", 1),
                           encoding="utf-8")

    with pytest.raises(PolicyNotApproved) as caught:
        build_all(fresh_settings, policy=policy)

    assert caught.value.code == "POLICY_SIGNATURE_INVALID"
    for code in DEMO_INSTITUTIONS:
        assert not extract_dir(fresh_settings, code).exists()


def test_single_user_fallback_modes(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_a", unix_group=None)
    # As root, extracts/ and <code>.builds/ are traversable but not listable, so the spawner can
    # open the folder to a group later; the build itself stays private.
    expected_root = 0o711 if os.geteuid() == 0 else 0o700
    assert stat.S_IMODE(fresh_settings.extracts_dir.stat().st_mode) == expected_root
    assert stat.S_IMODE((fresh_settings.extracts_dir / "bank_a.builds").stat().st_mode) == expected_root
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_missing_group_falls_back_to_private(fresh_settings: Settings) -> None:
    folder = build_extract(fresh_settings, "bank_a", unix_group="rst-no-such-group")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "applications.parquet").stat().st_mode) == 0o600


def test_failed_write_keeps_previous_extract(fresh_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = build_extract(fresh_settings, "bank_b")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def broken_write(self: pl.DataFrame, target: object, **options: object) -> None:
        target.write(b"PAR1 partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken_write)
    with pytest.raises(ExtractWriteFailed) as caught:
        build_extract(fresh_settings, "bank_b")

    assert caught.value.code == "EXTRACT_WRITE_FAILED"
    assert "原有提取保持不变" in caught.value.message
    after = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert after == before
    assert [path.name for path in (fresh_settings.extracts_dir / "bank_b.builds").iterdir()] == [
        os.path.basename(os.path.realpath(folder))]


@pytest.mark.parametrize(
    ("code", "error_code"),
    [
        ("BANK_A", "INVALID_INSTITUTION_CODE"),
        ("../bank_a", "INVALID_INSTITUTION_CODE"),
        ("a", "INVALID_INSTITUTION_CODE"),
        ("bank_z", "INSTITUTION_NOT_IN_WAREHOUSE"),
    ],
)
def test_invalid_institution_rejected(demo_settings: Settings, code: str, error_code: str) -> None:
    with pytest.raises(InvalidInstitutionError) as caught:
        build_extract(demo_settings, code)
    assert caught.value.code == error_code
    assert code in caught.value.message
    assert not (demo_settings.extracts_dir / code).exists()


def test_empty_warehouse_rejected(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(WarehouseMissingError) as caught:
        build_extract(settings, "bank_a")
    assert caught.value.code == "WAREHOUSE_EMPTY"
    assert "load-demo" in caught.value.message


def test_cli_load_and_build(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    loaded = _run_cli(settings, "load-demo")
    assert loaded.returncode == 0, loaded.stderr
    assert "已写入机构 bank_a 的演示申请数据 334 条" in loaded.stdout

    ensure_platform_keys(settings, list(DEMO_INSTITUTIONS), on_event=None)
    approve_shipped_policy(settings)
    built = _run_cli(settings, "build", "--unix-group-prefix", "rst-no-such-")
    assert built.returncode == 0, built.stderr
    for code in DEMO_INSTITUTIONS:
        assert f"已生成机构 {code} 的脱敏数据提取" in built.stdout
        assert (settings.extracts_dir / code / "manifest.json").is_file()
    assert "Unix 组 rst-no-such-bank_a 不存在" in built.stdout


@pytest.mark.parametrize(
    ("code", "expected"),
    [("BAD!", "格式不正确"), ("bank_z", "可用的机构代码：bank_a、bank_b、bank_c")],
)
def test_cli_bad_institution_exit_two(demo_settings: Settings, code: str, expected: str) -> None:
    result = _run_cli(demo_settings, "build", "--institution", code)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_build_before_load_exit_one(tmp_path: Path) -> None:
    result = _run_cli(Settings(data_dir=tmp_path), "build")
    assert result.returncode == 1
    assert "WAREHOUSE_EMPTY" in result.stderr
    assert "python -m extracts load-demo" in result.stderr
    assert "Traceback" not in result.stderr
