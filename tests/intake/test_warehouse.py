"""Accepted report data in the warehouse: encrypted partitions, atomic and idempotent loads, reads for validation."""

from __future__ import annotations

import io
import os
import shutil
import stat
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from intake.template_model import TemplateCatalog
from intake.warehouse import (
    MANIFEST_NAME,
    PeriodSelection,
    WarehouseLoadError,
    decrypt_accepted,
    decrypt_for_validation,
    load_submission,
    partition_associated_data,
    partition_dir,
    read_manifest,
    recover_interrupted_loads,
    warehouse_needs,
)
from regsandbox_core.documents import decrypt_document
from regsandbox_core.keystore import KeyStore
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.settings import Settings

TEMPLATE = "EAST_DGKHXXB"
FIELDS = ("KHTYBH", "KHMC", "ZJHM", "ZCZB", "CJRQ")
JANUARY = date(2025, 1, 31)
FEBRUARY = date(2025, 2, 28)
SECRET_NAME = "北京保密测试科技有限公司"
SECRET_ID = "91110000600037341L"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    return Settings(data_dir=data_dir)


@pytest.fixture
def store(settings: Settings) -> KeyStore:
    return ensure_platform_keys(settings, ["bank_a", "bank_b"], on_event=None)


def staged(tmp_path: Path, rows: list[dict[str, str]], name: str = "staged.parquet") -> Path:
    """A staging Parquet file as the reader writes it: text columns of the field codes and the line number."""
    path = tmp_path / name
    columns = {code: pa.array([row.get(code, "") for row in rows], pa.string()) for code in FIELDS}
    columns["_line"] = pa.array(range(2, len(rows) + 2), pa.int64())
    pq.write_table(pa.table(columns), path)
    return path


def customer(number: int, period: str, **changes: str) -> dict[str, str]:
    row = {"KHTYBH": f"C{number:04d}", "KHMC": SECRET_NAME, "ZJHM": SECRET_ID, "ZCZB": "5000000.00", "CJRQ": period}
    row.update(changes)
    return row


def load(settings: Settings, store: KeyStore, path: Path, *, institution: str = "bank_a", period: date = JANUARY,
         submission_id: int = 1, version: int = 1, raw_sm3: str = "a" * 64):
    return load_submission(settings, store, institution_code=institution, template_code=TEMPLATE, template_version=1,
                           field_codes=FIELDS, period_end=period, staged_path=path, submission_id=submission_id,
                           version=version, raw_sm3=raw_sm3)


def decrypted(settings: Settings, store: KeyStore, institution: str, period: date) -> pa.Table:
    folder = partition_dir(settings, TEMPLATE, institution, period)
    buffer = io.BytesIO()
    decrypt_document(store, institution, folder / "part-0.parquet.rssg", buffer,
                     partition_associated_data(TEMPLATE, institution, period.strftime("%Y%m%d")))
    return pq.read_table(io.BytesIO(buffer.getvalue()))


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".") and path.name != ".lock")


def test_load_writes_encrypted_partition(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    rows = [customer(1, "20250131"), customer(2, "20250131", ZCZB="")]

    outcome = load(settings, store, staged(tmp_path, rows))
    outcome.finish()

    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    assert folder == settings.data_dir / "warehouse/intake/EAST_DGKHXXB/institution=bank_a/period=20250131"
    assert outcome.written and outcome.path == folder / "part-0.parquet.rssg"
    table = decrypted(settings, store, "bank_a", JANUARY)
    assert table.column_names == [*FIELDS, "_period"]
    assert all(column.type == pa.string() for column in table.columns)
    assert table.to_pylist() == [{**row, "_period": "20250131"} for row in rows]
    manifest = read_manifest(folder)
    assert (manifest.submission_id, manifest.version, manifest.raw_sm3, manifest.rows) == (1, 1, "a" * 64, 2)
    ciphertext = outcome.path.read_bytes()
    assert ciphertext.startswith(b"RSSG")
    for value in (SECRET_NAME.encode(), SECRET_ID.encode(), b"C0001", b"KHTYBH", b"PAR1"):
        assert value not in ciphertext
    assert SECRET_ID not in (folder / MANIFEST_NAME).read_text("utf-8")
    for path in (outcome.path, folder / MANIFEST_NAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in (folder, folder.parent, folder.parent.parent, settings.data_dir / "warehouse" / "intake"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert leftovers(folder) == []


def test_same_submission_loads_once(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    path = staged(tmp_path, [customer(1, "20250131")])
    load(settings, store, path).finish()
    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    before = {name: (folder / name).stat() for name in ("part-0.parquet.rssg", MANIFEST_NAME)}

    again = load(settings, store, path)
    again.finish()

    assert not again.written
    for name, status in before.items():
        after = (folder / name).stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (status.st_ino, status.st_mtime_ns, status.st_size)


def test_newer_version_replaces_older_rejected(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet")).finish()

    newer = load(settings, store, staged(tmp_path, [customer(7, "20250131"), customer(8, "20250131")], "v2.parquet"),
                 submission_id=5, version=2, raw_sm3="b" * 64)
    newer.finish()

    assert newer.written
    assert decrypted(settings, store, "bank_a", JANUARY).column("KHTYBH").to_pylist() == ["C0007", "C0008"]
    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    assert (read_manifest(folder).submission_id, read_manifest(folder).version) == (5, 2)
    before = newer.path.read_bytes()
    with pytest.raises(WarehouseLoadError) as caught:
        load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet"), submission_id=1, version=1)
    assert (caught.value.code, caught.value.status) == ("WAREHOUSE_VERSION_STALE", 409)
    assert "第 2 版" in caught.value.message
    assert newer.path.read_bytes() == before
    assert leftovers(folder) == []


def test_other_institution_and_period_untouched(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")]), institution="bank_b", submission_id=9).finish()
    other = partition_dir(settings, TEMPLATE, "bank_b", JANUARY)
    snapshot = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in other.iterdir()}

    load(settings, store, staged(tmp_path, [customer(2, "20250131")], "a1.parquet"), submission_id=10).finish()
    load(settings, store, staged(tmp_path, [customer(3, "20250228")], "a2.parquet"), period=FEBRUARY,
         submission_id=11).finish()
    load(settings, store, staged(tmp_path, [customer(4, "20250131")], "a3.parquet"), submission_id=12,
         version=2).finish()

    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in other.iterdir()} == snapshot
    assert decrypted(settings, store, "bank_b", JANUARY).column("KHTYBH").to_pylist() == ["C0001"]
    assert decrypted(settings, store, "bank_a", FEBRUARY).column("KHTYBH").to_pylist() == ["C0003"]


@pytest.mark.parametrize("failing", ["part-0.parquet.rssg", MANIFEST_NAME])
def test_crash_before_replace_keeps_old_partition(settings: Settings, store: KeyStore, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet")).finish()
    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_replace = os.replace

    def crash(source: str | Path, target: str | Path) -> None:
        if Path(target).name == failing:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        load(settings, store, staged(tmp_path, [customer(2, "20250131")], "v2.parquet"), submission_id=2, version=2)
    monkeypatch.setattr(os, "replace", real_replace)

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert leftovers(folder) == []
    assert decrypted(settings, store, "bank_a", JANUARY).column("KHTYBH").to_pylist() == ["C0001"]
    assert read_manifest(folder).submission_id == 1


def test_crash_on_first_load_leaves_no_partition(settings: Settings, store: KeyStore, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(source: str | Path, target: str | Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        load(settings, store, staged(tmp_path, [customer(1, "20250131")]))
    monkeypatch.undo()

    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    assert sorted(path.name for path in folder.iterdir()) == [".lock"]


def test_undo_restores_previous_partition(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet")).finish()
    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    outcome = load(settings, store, staged(tmp_path, [customer(2, "20250131")], "v2.parquet"), submission_id=2,
                   version=2)
    assert decrypted(settings, store, "bank_a", JANUARY).column("KHTYBH").to_pylist() == ["C0002"]
    outcome.undo()

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    first = load(settings, store, staged(tmp_path, [customer(3, "20250228")], "f.parquet"), period=FEBRUARY,
                 submission_id=3)
    first.undo()
    assert sorted(path.name for path in partition_dir(settings, TEMPLATE, "bank_a", FEBRUARY).iterdir()) == [".lock"]


def interrupted_second_load(settings: Settings, store: KeyStore, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Accept version 1, then load version 2 and stop as a killed process would: neither finish nor undo."""
    load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet")).finish()
    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    load(settings, store, staged(tmp_path, [customer(2, "20250131")], "v2.parquet"), submission_id=2, version=2)
    assert len(leftovers(folder)) == 2
    return folder, before


def test_recovery_restores_state_of_accepted_submission(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    folder, before = interrupted_second_load(settings, store, tmp_path)
    requested: list[set[int]] = []

    settled = recover_interrupted_loads(settings, lambda ids: requested.append(ids) or {1})

    assert settled == [folder]
    assert requested == [{1, 2}]
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert decrypted(settings, store, "bank_a", JANUARY).column("KHTYBH").to_pylist() == ["C0001"]


def test_recovery_keeps_new_partition_when_its_commit_happened(settings: Settings, store: KeyStore,
                                                                tmp_path: Path) -> None:
    folder, _before = interrupted_second_load(settings, store, tmp_path)

    assert recover_interrupted_loads(settings, lambda ids: {1, 2}) == [folder]

    assert leftovers(folder) == []
    assert read_manifest(folder).submission_id == 2
    assert decrypted(settings, store, "bank_a", JANUARY).column("KHTYBH").to_pylist() == ["C0002"]


def test_recovery_after_crash_between_partition_and_manifest(settings: Settings, store: KeyStore,
                                                             tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet")).finish()
    folder = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    original = folder / "part-0.parquet.rssg"
    os.link(original, folder / ".part-0.parquet.rssg.0123.previous")
    os.link(folder / MANIFEST_NAME, folder / f".{MANIFEST_NAME}.4567.previous")
    replacement = folder / "new.tmp"
    replacement.write_bytes(b"a partition of a load that never wrote its manifest")
    os.replace(replacement, original)

    assert recover_interrupted_loads(settings, lambda ids: ids) == [folder]

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_recovery_without_accepted_state_changes_nothing(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    folder, _before = interrupted_second_load(settings, store, tmp_path)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}

    assert recover_interrupted_loads(settings, lambda ids: set()) == []

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == files


def test_recovery_ignores_settled_folders(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")], "v1.parquet")).finish()

    assert recover_interrupted_loads(settings, lambda ids: pytest.fail("no folder needs the database")) == []


def test_decrypt_accepted_selects_periods(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    for number, period in enumerate((date(2024, 11, 30), date(2024, 12, 31), JANUARY), start=1):
        text = period.strftime("%Y%m%d")
        load(settings, store, staged(tmp_path, [customer(number, text)], f"{text}.parquet"), period=period,
             submission_id=number).finish()
    work = tmp_path / "work"
    work.mkdir(mode=0o700)

    previous = decrypt_accepted(settings, store, "bank_a", TEMPLATE, PeriodSelection(frozenset({"20241231"})), work)
    earlier = decrypt_accepted(settings, store, "bank_a", TEMPLATE, PeriodSelection(before="20250131"), work)
    only_accepted = decrypt_accepted(settings, store, "bank_a", TEMPLATE, PeriodSelection(every=True), work, {1, 3})
    other = decrypt_accepted(settings, store, "bank_b", TEMPLATE, PeriodSelection(every=True), work)

    assert [pq.read_table(path).column("_period").to_pylist() for path in previous] == [["20241231"]]
    assert [path.name for path in earlier] == ["EAST_DGKHXXB.20241130.parquet", "EAST_DGKHXXB.20241231.parquet"]
    assert [pq.read_table(path).column("KHTYBH")[0].as_py() for path in only_accepted] == ["C0001", "C0003"]
    assert other == []
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in earlier)


def test_moved_partition_does_not_decrypt(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")])).finish()
    source = partition_dir(settings, TEMPLATE, "bank_a", JANUARY)
    target = partition_dir(settings, TEMPLATE, "bank_a", FEBRUARY)
    shutil.copytree(source, target)
    work = tmp_path / "work"
    work.mkdir()

    files = decrypt_accepted(settings, store, "bank_a", TEMPLATE, PeriodSelection(every=True), work)

    assert [path.name for path in files] == ["EAST_DGKHXXB.20250131.parquet"]
    assert sorted(path.name for path in work.iterdir()) == ["EAST_DGKHXXB.20250131.parquet"]


def test_warehouse_needs_of_loan_template() -> None:
    template = TemplateCatalog.load().get("EAST_DGXDYWJJB")

    needs = warehouse_needs(template, date(2025, 2, 28), date(2025, 2, 1))

    own = needs["EAST_DGXDYWJJB"]
    assert own.before == "20250228"
    assert "20250131" in own.periods
    assert own.matches("20250131")
    assert own.matches("20240630")
    assert not own.matches("20250228")
    assert not own.matches("20250331")
    for code, selection in needs.items():
        if code != "EAST_DGXDYWJJB":
            assert selection.matches("20250228")


def test_decrypt_for_validation_creates_private_folder(settings: Settings, store: KeyStore, tmp_path: Path) -> None:
    load(settings, store, staged(tmp_path, [customer(1, "20250131")])).finish()
    work = tmp_path / "warehouse-work"

    files = decrypt_for_validation(settings, store, "bank_a", {TEMPLATE: PeriodSelection(before="20250228"),
                                                               "EAST_XDHTB": PeriodSelection(every=True)}, work)

    assert list(files) == [TEMPLATE]
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
