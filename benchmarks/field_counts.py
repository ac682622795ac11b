"""Cost of the field-count scan of validation (字段完整性) against a bare DuckDB read of the same staging file.

One run generates the 对公信贷业务借据表 file of benchmarks/intake_data.py (default 1,000,000 rows ×
30 columns), stages it once with ``intake.reader.stage_file`` and then measures, in interleaved rounds
in this one process:

(a) baseline: a bare DuckDB read of the staging Parquet file, ``sum(length(column))`` over every
    column, in a new in-memory connection;
(b) ``intake.validate.validate_staged`` of the same file, as an upload runs it. Its ``step_seconds``
    give the time of the ``field_counts`` step (one ``count_if`` per field in one scan) and of the
    whole validation.

It prints the median of each figure, the field-count scan as a multiple of (a) and as a share of
(b), and the machine. It writes nothing to docs/; the generated files live in a temporary folder
under /tmp that is deleted at the end.

    .venv/bin/python benchmarks/field_counts.py [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import intake_data  # noqa: E402
from benchmarks.intake_data import LICENSE_NO, PERIOD_END, PERIOD_START  # noqa: E402
from benchmarks.intake_validation import TEMPLATE_CODE, machine, stage_batch  # noqa: E402

MAX_ROUNDS = 10


def bare_read(staging: Path, codes: list[str], memory_limit: str) -> float:
    """Return the seconds of one aggregate that reads every column of the staging file."""
    import duckdb

    touched = ", ".join(f'sum(length("{code}"))' for code in codes)
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        started = time.perf_counter()
        con.execute(f"SELECT count(*), {touched} FROM read_parquet(?)", [str(staging)]).fetchone()
        return time.perf_counter() - started
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="data rows of the generated file")
    parser.add_argument("--rounds", type=int, default=5, help=f"rounds of (a) and (b), at most {MAX_ROUNDS}")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args(argv)

    from intake.reader import stage_file
    from intake.template_model import TemplateCatalog
    from intake.validate import DUCKDB_MEMORY_SHARE, ValidationContext, memory_bytes, validate_staged

    catalog = TemplateCatalog.load()
    template = catalog.get(TEMPLATE_CODE)
    codes = [item.code for item in template.fields]
    work = Path(tempfile.mkdtemp(prefix="field_counts-", dir="/tmp"))
    try:
        data = intake_data.generate(work / "data", args.rows, args.seed, log=lambda text: print(text, file=sys.stderr))
        batch = stage_batch(data, work)
        (work / "staging").mkdir()
        staged = stage_file(data.loans, f"{TEMPLATE_CODE}.txt", template.file_layout(), work / "staging")
        context = ValidationContext(
            period_end=PERIOD_END, period_start=PERIOD_START, institution_identifiers=frozenset({LICENSE_NO}),
            batch={code: Path(path) for code, path in batch.items()}, warehouse={TEMPLATE_CODE: [data.warehouse]})
        # The validator gives DuckDB this share of its budget; the baseline gets the same limit.
        duckdb_limit = f"{int(memory_bytes(context.memory_limit) * DUCKDB_MEMORY_SHARE)}B"

        bare, scan, validation = [], [], []
        for number in range(max(1, min(args.rounds, MAX_ROUNDS))):
            bare.append(bare_read(staged.path, codes, duckdb_limit))
            result = validate_staged(staged, template, context, work / f"validate-{number}", catalog=catalog)
            scan.append(result.step_seconds["field_counts"])
            validation.append(result.seconds)
            print(f"round {number + 1}: bare read {bare[-1]:.3f} s, field_counts {scan[-1]:.3f} s, "
                  f"validation {validation[-1]:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    info = machine()
    a, b, total = statistics.median(bare), statistics.median(scan), statistics.median(validation)
    print(f"rows {staged.rows:,}, {len(codes)} fields, staging file {staged.path.name}, rounds {len(bare)}")
    print(f"(a) bare DuckDB read of the staging file: {a:.3f} s (median)")
    print(f"(b) field_counts step of validation: {b:.3f} s (median), {b / a:.2f} × (a)")
    print(f"    whole validation: {total:.2f} s (median); the field_counts step is {b / total:.1%} of it")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']:.1f} GiB, Python {info['python']}, "
          f"DuckDB {info['versions']['duckdb']}, load average {info['load']:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
