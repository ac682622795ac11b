"""Benchmark of the data quality measures and of a token re-identification, each against a baseline in the same run.

Run from the repository root (about two minutes with the defaults, on SQLite in a temporary folder):

    .venv/bin/python benchmarks/data_quality.py               # writes the data_quality section of docs/benchmarks.md
    .venv/bin/python benchmarks/data_quality.py --rows 100000 --no-write   # smoke run

Data quality: a migrated SQLite database with ``--institutions`` institutions and ``--tasks`` past
collection tasks of one template, every target submitted once with 10 validated rows. One upload in
ten has a findings Parquet file with errors on 2 rows, the others have no error and no file. Every
upload has field counts (21 fields, 17 required), so the field completeness query joins a row each.

- (a) baseline: :func:`admin_api.task_statistics.rate_rows` per institution, the grouped query
  behind the on-time rates of the page 报送统计, over the same targets.
- (b) :func:`admin_api.data_quality.quality_report` per institution, the grouping of (a), with the
  findings cache filled, as on every page view after the first in a process.
- (c) the same per institution, template and period (one group per target), findings cache empty,
  so every findings file is read.
- (d) as (c) with the cache filled.

Re-identification: one institution's warehouse partition of ``--rows`` rows whose ID column has
``--rows`` distinct 18-character values, encrypted as accepted report data is.

- (e) baseline: decrypt the partition into memory and read the ID column.
- (f) :func:`extracts.reidentify.find_raw_value` of a token that matches no value, with one key
  version, so every distinct value is tokenised: the slowest lookup.

Each figure is the median of ``--repeat`` runs (timed with ``time.perf_counter``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "EAST_DGKHXXB"
INSTITUTION = "bench_a"
PERIOD = "20261130"


def _median_seconds(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- data quality ----------------------------------------------------------------------------------


def _seed_tasks(session, settings, institutions: int, tasks: int) -> int:
    """Insert the institutions, tasks, targets, uploads and findings files; return the number of findings files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sqlalchemy import insert, select

    from admin_api.models import (
        Institution,
        ReportSubmission,
        ReportTask,
        ReportTaskTarget,
        SubmissionEvent,
        SubmissionFieldCount,
        User,
    )
    from intake.validate import FINDINGS_SCHEMA

    user_id = session.scalar(select(User.id).where(User.username == "reporter_a"))
    codes = [f"bench{index:04d}" for index in range(institutions)]
    session.execute(insert(Institution), [{"code": code, "name": f"基准测试机构{code}", "type": "银行",
                                           "status": "active"} for code in codes])
    ids = dict(session.execute(select(Institution.code, Institution.id).where(Institution.code.in_(codes))).all())
    findings = {"line": pa.array([3, 3, 8], pa.int64()), "severity": pa.array(["error"] * 3, pa.string())}
    table = pa.table({name: findings.get(name, pa.nulls(3, FINDINGS_SCHEMA.field(name).type))
                      for name in FINDINGS_SCHEMA.names}, schema=FINDINGS_SCHEMA)
    files = 0
    for number in range(tasks):
        period = date(2025, 1, 1) + timedelta(days=7 * number)
        deadline = datetime.combine(period, datetime.min.time(), UTC) + timedelta(days=10)
        task_id = session.scalar(insert(ReportTask).values(
            template_code=TEMPLATE, template_version=1, period_end=period, frequency="monthly", deadline=deadline,
            target_kind="institutions", target_values=[], reminder_days=[], status="open", created_by=user_id,
            created_at=deadline).returning(ReportTask.id))
        session.execute(insert(ReportTaskTarget), [{"task_id": task_id, "institution_id": ids[code],
                                                    "reminders_sent": []} for code in codes])
        uploads = []
        for index, code in enumerate(codes):
            with_errors = (index + number) % 10 == 0
            relative = f"intake/bench/{code}-{number}/findings.parquet"
            if with_errors:
                path = settings.data_dir / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path)
                files += 1
            at = deadline + timedelta(days=1 if (index + number) % 4 == 0 else -1)
            uploads.append({
                "institution_id": ids[code], "template_code": TEMPLATE, "template_version": 1,
                "template_digest": "0" * 64, "period_end": period, "version": 1, "state": "accepted",
                "original_filename": "report.txt", "file_type": "text", "byte_size": 100, "raw_sm3": "0" * 64,
                "raw_path": relative, "key_version": 1, "row_count": 10, "error_count": 3 if with_errors else 0,
                "warning_count": 0, "explained_warning_count": 0, "findings_path": relative,
                "submitted_by": user_id, "submitted_at": at, "created_at": at, "updated_at": at})
        submission_ids = session.scalars(insert(ReportSubmission).returning(ReportSubmission.id,
                                                                            sort_by_parameter_order=True),
                                         uploads).all()
        session.execute(insert(SubmissionEvent), [
            {"submission_id": submission_id, "from_state": None, "to_state": "pending_review", "actor": "bench",
             "at": upload["submitted_at"]} for submission_id, upload in zip(submission_ids, uploads)])
        session.execute(insert(SubmissionFieldCount), [
            {"submission_id": submission_id, "row_count": 10, "field_count": 21, "required_field_count": 17,
             "present_values": 200, "required_present_values": 170, "field_values": {}}
            for submission_id in submission_ids])
    session.commit()
    return files


def _quality(data_dir: Path, institutions: int, tasks: int, repeat: int) -> dict:
    from admin_api import data_quality
    from admin_api.db import make_engine, make_session_factory
    from admin_api.migrate import upgrade_to_head
    from admin_api.seed import seed_demo
    from admin_api.task_statistics import RateFilter, rate_rows
    from regsandbox_core.settings import Settings

    data_dir.mkdir(mode=0o700)
    url = f"sqlite:///{data_dir / 'admin.db'}"
    settings = Settings(data_dir=data_dir, database_url=url)
    upgrade_to_head(url)
    factory = make_session_factory(make_engine(url))
    with factory() as session:
        seed_demo(session, settings)
        files = _seed_tasks(session, settings, institutions, tasks)
    every_group = data_quality.QualityFilter()
    per_institution = data_quality.QualityFilter(group_by=("institution",))

    def baseline() -> object:
        with factory() as session:
            return rate_rows(session, "institution", RateFilter(), limit=None)

    def report(quality_filter: data_quality.QualityFilter) -> data_quality.QualityReport:
        with factory() as session:
            return data_quality.quality_report(session, settings, quality_filter, limit=100)

    def cold() -> object:
        data_quality.clear_error_row_cache()
        return report(every_group)

    checked = cold()
    assert checked.group_count == institutions * tasks, checked.group_count
    assert checked.total.rows_with_errors == 2 * files, checked.total.rows_with_errors
    assert checked.total.field_reports == institutions * tasks, checked.total.field_reports
    return {"targets": institutions * tasks, "findings_files": files,
            "baseline": _median_seconds(baseline, repeat),
            "institution": _median_seconds(lambda: report(per_institution), repeat),
            "cold": _median_seconds(cold, repeat), "warm": _median_seconds(lambda: report(every_group), repeat)}


# --- re-identification -----------------------------------------------------------------------------


def _write_partition(settings, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from intake.warehouse import MANIFEST_NAME, PARTITION_NAME, Manifest, partition_associated_data
    from regsandbox_core.crypto import sm3_file
    from regsandbox_core.documents import encrypt_document
    from regsandbox_core.platform_keys import ensure_platform_keys

    store = ensure_platform_keys(settings, [INSTITUTION], on_event=None)
    folder = settings.warehouse_dir / "intake" / TEMPLATE / f"institution={INSTITUTION}" / f"period={PERIOD}"
    folder.mkdir(parents=True)
    ids = pa.array([f"{310115190001010000 + number:018d}" for number in range(rows)], pa.string())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"ZJHM": ids, "_period": pa.array([PERIOD] * rows, pa.string())}), buffer)
    buffer.seek(0)
    encrypted = encrypt_document(store, INSTITUTION, buffer, folder / PARTITION_NAME,
                                 partition_associated_data(TEMPLATE, INSTITUTION, PERIOD))
    manifest = Manifest(submission_id=1, version=1, raw_sm3="0" * 64, rows=rows, template_version=1,
                        partition_sm3=sm3_file(folder / PARTITION_NAME), key_version=encrypted.version)
    (folder / MANIFEST_NAME).write_text(json.dumps(asdict(manifest)), encoding="utf-8")


def _reidentify(data_dir: Path, rows: int, repeat: int) -> dict:
    from extracts.reidentify import TokenColumn, find_raw_value
    from extracts.sources import intake_tables
    from intake.warehouse import partition_associated_data
    from regsandbox_core.documents import decrypt_document
    from regsandbox_core.keystore import KIND_TOKEN
    from regsandbox_core.platform_keys import open_keystore
    from regsandbox_core.settings import Settings

    import pyarrow.parquet as pq

    data_dir.mkdir(mode=0o700)
    settings = Settings(data_dir=data_dir)
    _write_partition(settings, rows)
    store = open_keystore(settings)
    key = store.current(INSTITUTION, KIND_TOKEN)
    target = TokenColumn(INSTITUTION, TEMPLATE.lower(), "intake", TEMPLATE, "ZJHM", key.version, "bench")
    absent = secrets.token_hex(32)

    def baseline() -> object:
        partition = intake_tables(settings, INSTITUTION)[0].partitions[0]
        buffer = io.BytesIO()
        decrypt_document(store, INSTITUTION, partition.path, buffer,
                         partition_associated_data(TEMPLATE, INSTITUTION, PERIOD))
        buffer.seek(0)
        return pq.read_table(buffer, columns=["ZJHM"])

    def lookup() -> object:
        found = find_raw_value(settings, store, target, absent, [key])
        assert found is None
        return found

    return {"rows": rows, "baseline": _median_seconds(baseline, repeat), "lookup": _median_seconds(lookup, repeat)}


# --- report ----------------------------------------------------------------------------------------


def _machine() -> list[str]:
    import duckdb
    import sqlalchemy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {memory:.1f} GiB; load before the run "
        f"{os.getloadavg()[0]:.2f}",
        f"- OS: {platform.platform()}; Python {platform.python_version()}; DuckDB {duckdb.__version__}; "
        f"SQLAlchemy {sqlalchemy.__version__}; SQLite {__import__('sqlite3').sqlite_version}",
    ]


def _report(arguments: argparse.Namespace, quality: dict, lookup: dict, machine: list[str]) -> str:
    return "\n".join([
        "## Data quality and token re-identification",
        "",
        "Generated by `benchmarks/data_quality.py`. Each figure is the median of "
        f"{arguments.repeat} runs in one process.",
        "",
        "### Machine and command",
        *machine,
        f"- Command: `.venv/bin/python benchmarks/data_quality.py --institutions {arguments.institutions} "
        f"--tasks {arguments.tasks} --rows {arguments.rows} --repeat {arguments.repeat}`",
        "",
        "### Data quality (SQLite)",
        f"{quality['targets']:,} targets ({arguments.institutions} institutions × {arguments.tasks} past tasks), "
        f"one validated upload each, {quality['findings_files']:,} of them with a findings file with errors.",
        "",
        "| measurement | seconds | ratio to (a) |",
        "|---|---|---|",
        f"| (a) on-time rates per institution (`rate_rows`), baseline | {quality['baseline']:.3f} | 1.00 |",
        f"| (b) data quality per institution, findings cache filled | {quality['institution']:.3f} | "
        f"{quality['institution'] / quality['baseline']:.2f} |",
        f"| (c) data quality per institution × template × period, findings cache empty | {quality['cold']:.3f} | "
        f"{quality['cold'] / quality['baseline']:.2f} |",
        f"| (d) as (c), cache filled | {quality['warm']:.3f} | {quality['warm'] / quality['baseline']:.2f} |",
        "",
        "### Token re-identification",
        f"One warehouse partition of {lookup['rows']:,} rows with as many distinct resident IDs.",
        "",
        "| measurement | seconds | ratio to (e) |",
        "|---|---|---|",
        f"| (e) decrypt the partition in memory and read the ID column, baseline | {lookup['baseline']:.3f} | 1.00 |",
        f"| (f) look up a token that matches no value (every value tokenised, one key version) | "
        f"{lookup['lookup']:.3f} | {lookup['lookup'] / lookup['baseline']:.2f} |",
        "",
        "### Observations",
        "- (c) is the first page view in a process. Uploads without errors need no findings file, so the files "
        "read are those of uploads with errors. Later views read only the files of uploads with errors added since.",
        "- A lookup hashes each distinct value of the column once per key version tried, one HMAC-SM3 call "
        "from Python per value, so (f) grows with the distinct values of one institution's table. A token that "
        "matches stops the search at its value.",
        "- Other processes shared the cores during the run (see the load above), so the figures vary between runs.",
    ]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=400, help="institutions with targets (default 400)")
    parser.add_argument("--tasks", type=int, default=20, help="past collection tasks (default 20)")
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows and distinct IDs of the re-identification partition (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating docs/benchmarks.md")
    arguments = parser.parse_args()

    machine = _machine()
    data_dir = Path(tempfile.mkdtemp(prefix="regsandbox-quality-bench-"))
    try:
        os.chmod(data_dir, 0o700)
        quality = _quality(data_dir / "quality", arguments.institutions, arguments.tasks, arguments.repeat)
        print("quality", quality, flush=True)
        lookup = _reidentify(data_dir / "reidentify", arguments.rows, arguments.repeat)
        print("reidentify", lookup, flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    section = _report(arguments, quality, lookup, machine)
    if arguments.no_write:
        print(section)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report_page import write_section

        write_section("data_quality", section)
        print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
