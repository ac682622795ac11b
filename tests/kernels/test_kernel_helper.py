"""The notebook helper library against real demo extracts and a real locked DuckDB."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

import regsandbox_kernel as rs
from regsandbox_core.settings import Settings


def test_tables_from_manifest(bank_a_dir: Path) -> None:
    assert rs.tables() == ["applications"]
    assert rs.manifest()["institution"] == "bank_a"
    assert rs.extract_dir() == bank_a_dir.resolve()


def test_sql_returns_polars(bank_a_dir: Path) -> None:
    result = rs.sql("SELECT creditability, count(*) AS n FROM applications GROUP BY 1 ORDER BY 1")
    assert isinstance(result, pl.DataFrame)
    assert result["creditability"].to_list() == [0, 1]
    assert result["n"].sum() == 334


def test_sql_with_parameters(bank_a_dir: Path) -> None:
    everything = rs.sql("SELECT count(*) AS n FROM applications")["n"][0]
    long_loans = rs.sql("SELECT count(*) AS n FROM applications WHERE duration_in_month > ?", [24])["n"][0]
    named = rs.sql("SELECT count(*) AS n FROM applications WHERE duration_in_month > $months", {"months": 24})["n"][0]
    assert 0 < long_loans < everything
    assert named == long_loans


def test_sql_statement_without_result(bank_a_dir: Path) -> None:
    created = rs.sql("CREATE TABLE bad_loans AS SELECT * FROM applications WHERE creditability = 1")
    assert isinstance(created, pl.DataFrame)
    assert rs.sql("SELECT count(*) AS n FROM bad_loans")["n"][0] == 102


def test_table_matches_manifest(bank_a_dir: Path) -> None:
    frame = rs.table("applications")
    (entry,) = rs.manifest()["tables"]
    assert frame.height == entry["row_count"] == 334
    assert frame.columns == [column["name"] for column in entry["columns"]]
    treatments = {column["name"]: column["treatment"] for column in entry["columns"]}
    assert (treatments["name"], treatments["id_number"], treatments["mobile"]) == ("partial_mask", "token", "partial_mask")
    assert all(len(token) == 32 for token in frame["id_number"].to_list())


def test_unknown_table_lists_available(bank_a_dir: Path) -> None:
    with pytest.raises(rs.UnknownTableError) as caught:
        rs.table("customers")
    assert caught.value.code == "UNKNOWN_TABLE"
    assert "customers" in caught.value.message
    assert "applications" in caught.value.message


@pytest.mark.parametrize(
    "query_template",
    [
        "SELECT * FROM read_parquet('{other}/applications.parquet')",
        "SELECT * FROM '{other}/applications.parquet'",
        "SELECT * FROM read_parquet('{own}/../bank_b/applications.parquet')",
        "SELECT * FROM read_json('{other}/manifest.json')",
        "SELECT * FROM glob('{root}/*')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "ATTACH '{root}/other.duckdb' AS other",
    ],
)
def test_other_folder_rejected(bank_a_dir: Path, kernel_settings: Settings, query_template: str) -> None:
    own = bank_a_dir.resolve()
    query = query_template.format(own=own, other=own.parent / "bank_b", root=kernel_settings.data_dir)
    with pytest.raises(rs.SandboxAccessError) as caught:
        rs.sql(query)
    error = caught.value
    assert error.code == "SANDBOX_ACCESS_DENIED"
    assert isinstance(error, PermissionError)
    assert error.path and error.path in error.message
    assert "沙箱禁止访问" in error.message
    assert str(own) in error.message


def test_extension_load_rejected(bank_a_dir: Path) -> None:
    with pytest.raises(rs.SandboxAccessError) as caught:
        rs.sql("LOAD httpfs")
    assert caught.value.code == "SANDBOX_ACCESS_DENIED"
    assert caught.value.path is None
    assert "扩展" in caught.value.message


@pytest.mark.parametrize("target", ["{root}/copy.csv", "{own}/copy.csv", "/tmp/rst-copy.parquet"])
def test_copy_to_rejected(bank_a_dir: Path, kernel_settings: Settings, target: str) -> None:
    path = Path(target.format(root=kernel_settings.data_dir, own=bank_a_dir.resolve()))
    with pytest.raises(rs.SandboxAccessError) as caught:
        rs.sql(f"COPY (SELECT * FROM applications) TO '{path}'")
    assert caught.value.code == "SANDBOX_WRITE_REJECTED"
    assert not path.exists()


def test_export_database_rejected(bank_a_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(rs.SandboxAccessError) as caught:
        rs.sql(f"EXPORT DATABASE '{tmp_path / 'dump'}'")
    assert caught.value.code == "SANDBOX_WRITE_REJECTED"
    assert not (tmp_path / "dump").exists()


def test_raw_connection_refuses_copy_elsewhere(bank_a_dir: Path, tmp_path: Path) -> None:
    con = rs.connect()
    try:
        with pytest.raises(duckdb.PermissionException):
            con.sql(f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'")
        assert not (tmp_path / "out.csv").exists()
    finally:
        con.close()


@pytest.mark.parametrize(
    "statement",
    [
        "SET enable_external_access=true",
        "SET lock_configuration=false",
        "RESET allowed_directories",
        "SET allowed_directories=['/']",
        "SET temp_directory='/tmp'",
    ],
)
def test_raw_connection_settings_locked(bank_a_dir: Path, statement: str) -> None:
    con = rs.connect()
    try:
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.sql(statement)
        allowed = con.sql("SELECT current_setting('allowed_directories') AS allowed").fetchall()[0][0]
        assert allowed == [str(bank_a_dir.resolve()) + "/"]
    finally:
        con.close()


def test_raw_connection_exposes_views(bank_a_dir: Path) -> None:
    con = rs.connect()
    try:
        assert con.sql("SELECT count(*) FROM applications").fetchall() == [(334,)]
    finally:
        con.close()


def test_symlink_out_of_extract_rejected(tmp_path: Path, kernel_settings: Settings, monkeypatch) -> None:
    folder = tmp_path / "extract"
    folder.mkdir()
    source = kernel_settings.extracts_dir / "bank_a"
    for name in ("manifest.json", "manifest.json.sig"):
        (folder / name).write_bytes((source / name).read_bytes())
    shutil.copy(kernel_settings.extracts_dir / "platform_signing_keys.json", tmp_path / "platform_signing_keys.json")
    (folder / "applications.parquet").symlink_to(kernel_settings.extracts_dir / "bank_b" / "applications.parquet")
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(folder))
    monkeypatch.delenv("REGSANDBOX_INSTITUTION", raising=False)
    with pytest.raises(rs.SandboxAccessError):
        rs.connect()


def test_missing_variable_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGSANDBOX_EXTRACT_DIR", raising=False)
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.tables()
    assert caught.value.code == "EXTRACT_DIR_NOT_SET"
    assert "REGSANDBOX_EXTRACT_DIR" in caught.value.message


def test_missing_folder_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(tmp_path / "absent"))
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.sql("SELECT 1")
    assert caught.value.code == "EXTRACT_DIR_MISSING"


@pytest.mark.parametrize(
    "manifest_text",
    [
        "not json",
        json.dumps({"institution": "bank_a"}),
        json.dumps({"institution": "bank_a", "tables": [{"name": "applications", "file": "../bank_b/applications.parquet"}]}),
        json.dumps({"institution": "bank_a", "tables": [{"name": "x; DROP", "file": "applications.parquet"}]}),
        json.dumps({"institution": "bank_a", "tables": [{"name": "applications", "file": ".."}]}),
    ],
)
def test_bad_manifest_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, manifest_text: str) -> None:
    (tmp_path / "manifest.json").write_text(manifest_text, encoding="utf-8")
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(tmp_path))
    monkeypatch.delenv("REGSANDBOX_INSTITUTION", raising=False)
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.connect()
    assert caught.value.code == "MANIFEST_INVALID"


def test_institution_mismatch_rejected(bank_a_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGSANDBOX_INSTITUTION", "bank_b")
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.connect()
    assert caught.value.code == "EXTRACT_INSTITUTION_MISMATCH"


def test_connection_follows_variable(bank_a_dir: Path, kernel_settings: Settings, monkeypatch) -> None:
    assert rs.sql("SELECT count(*) AS n FROM applications")["n"][0] == 334
    monkeypatch.setenv("REGSANDBOX_EXTRACT_DIR", str(kernel_settings.extracts_dir / "bank_b"))
    monkeypatch.setenv("REGSANDBOX_INSTITUTION", "bank_b")
    assert rs.sql("SELECT count(*) AS n FROM applications")["n"][0] == 333


@pytest.mark.parametrize(
    ("function", "name", "expected"),
    [
        (rs.mlflow_experiment, "scorecard", "bank_a/scorecard"),
        (rs.mlflow_experiment, " scorecard ", "bank_a/scorecard"),
        (rs.mlflow_experiment, "bank_a/scorecard", "bank_a/scorecard"),
        (rs.mlflow_experiment, "bank_b/scorecard", "bank_a/bank_b/scorecard"),
        (rs.registered_model_name, "scorecard", "bank_a.scorecard"),
        (rs.registered_model_name, "bank_a.scorecard", "bank_a.scorecard"),
        (rs.registered_model_name, "bank_b.scorecard", "bank_a.bank_b.scorecard"),
    ],
)
def test_mlflow_names_prefixed(bank_a_dir: Path, function, name: str, expected: str) -> None:
    assert function(name) == expected


def test_mlflow_names_from_manifest(bank_a_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGSANDBOX_INSTITUTION")
    assert rs.mlflow_experiment("pd") == "bank_a/pd"
    assert rs.registered_model_name("pd") == "bank_a.pd"


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_mlflow_name_rejected(bank_a_dir: Path, name: str) -> None:
    with pytest.raises(rs.InvalidNameError):
        rs.mlflow_experiment(name)
    with pytest.raises(rs.InvalidNameError):
        rs.registered_model_name(name)


def test_invalid_institution_variable_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGSANDBOX_INSTITUTION", "Bank A")
    with pytest.raises(rs.ExtractNotConfiguredError) as caught:
        rs.mlflow_experiment("x")
    assert caught.value.code == "INSTITUTION_NOT_CONFIGURED"


def _isolated_site(tmp_path: Path, patterns: tuple[str, ...]) -> Path:
    """Return a folder holding only the helper, regsandbox_core and the packages matching ``patterns``."""
    site_packages = Path(duckdb.__file__).resolve().parents[1]
    project = Path(rs.__file__).resolve().parents[2]
    isolated = tmp_path / "site"
    isolated.mkdir()
    for pattern in patterns:
        for entry in site_packages.glob(pattern):
            (isolated / entry.name).symlink_to(entry)
    (isolated / "regsandbox_kernel").symlink_to(project / "kernels" / "regsandbox_kernel")
    (isolated / "regsandbox_core").symlink_to(project / "regsandbox_core")
    return isolated


def _run_isolated(isolated: Path, folder: Path, code: str) -> subprocess.CompletedProcess[str]:
    # -I ignores PYTHON* variables and the user site, -S skips site-packages entirely.
    return subprocess.run(
        [sys._base_executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(isolated)!r})\n" + code],
        env={"REGSANDBOX_EXTRACT_DIR": str(folder), "REGSANDBOX_INSTITUTION": "bank_a"},
        capture_output=True,
        text=True,
        timeout=60,
    )


DATA_PACKAGES = ("duckdb", "duckdb-*.dist-info", "_duckdb*.so", "polars", "polars-*.dist-info", "_polars_runtime*",
                 "polars_runtime*")
CRYPTO_PACKAGES = ("cryptography", "cryptography-*.dist-info", "tongsuopy", "tongsuopy-*.dist-info", "gmssl",
                   "gmssl-*.dist-info", "Cryptodome", "pycryptodomex-*.dist-info", "cffi", "cffi-*.dist-info",
                   "_cffi_backend*")


def test_importable_with_duckdb_and_polars_only(bank_a_dir: Path, tmp_path: Path) -> None:
    """Import the helper with duckdb and polars only: naming works, opening the extract fails closed."""
    isolated = _isolated_site(tmp_path, DATA_PACKAGES)
    code = (
        "import regsandbox_kernel as rs\n"
        "print(rs.mlflow_experiment('pd'))\n"
        "try:\n"
        "    rs.table('applications')\n"
        "except rs.ExtractNotConfiguredError as error:\n"
        "    print(error.code)\n"
    )
    result = _run_isolated(isolated, bank_a_dir, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["bank_a/pd", "SIGNATURE_CHECK_UNAVAILABLE"]


def test_reads_with_signature_packages_only(bank_a_dir: Path, tmp_path: Path) -> None:
    """With the SM2 packages added, the helper verifies and reads the extract without pyarrow, pandas or numpy."""
    isolated = _isolated_site(tmp_path, DATA_PACKAGES + CRYPTO_PACKAGES)
    code = (
        "import regsandbox_kernel as rs\n"
        "print(rs.table('applications').height, rs.mlflow_experiment('pd'))\n"
        "heavy = {'pyarrow', 'pandas', 'numpy', 'mlflow', 'pydantic'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    result = _run_isolated(isolated, bank_a_dir, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["334 bank_a/pd", "[]"]
