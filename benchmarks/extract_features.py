"""Benchmark of the cross-institution features against one bare read of the same warehouse.

Run from the repository root:

    .venv/bin/python benchmarks/extract_features.py                  # 400 institutions, writes docs/benchmarks.md
    .venv/bin/python benchmarks/extract_features.py --institutions 20 --no-write   # smoke run

The warehouse holds, for each institution, one accepted period of the four input templates of
:mod:`extracts.features` (对公客户信息表, 信贷合同表, 对公信贷业务借据表, 担保合同表), loaded through
:func:`intake.warehouse.load_submission` (encrypted partitions). Each institution has
``--customers`` corporate customers drawn from a shared pool three times smaller than all
customer rows together, so a customer has three lenders on average. Every fifth customer has a
guarantee contract whose guarantor is drawn from the pool.

Each phase runs in its own process, so its peak resident memory (``ru_maxrss`` from ``wait4``) is
its own:

- ``bare``: decrypt every input partition and write each template's rows of all institutions to
  one zstd Parquet file with a DuckDB COPY: the cost of reading the whole warehouse once.
- ``features``: :class:`extracts.features.CrossInstitutionFeatures` computes the whole-warehouse
  feature set once (decryption, SQL, guarantee graph), then writes every institution's slice
  with its key tokenised, as :func:`extracts.builder.build_all` does.

The results replace the ``extract_features`` section of docs/benchmarks.md unless --no-write is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

PERIOD = date(2025, 3, 31)
SEED = 20261205
LENDERS_PER_CUSTOMER = 3
GUARANTEE_EVERY = 5


def _codes(count: int) -> list[str]:
    return [f"bank_{index:03d}" for index in range(count)]


def _uscc(number: int) -> str:
    from stdnum.cn import uscc

    body = f"91310115{number:09d}"
    return body + uscc.calc_check_digit(body)


def _rows(code: str, pool: list[int], customers: int, generator: random.Random,
          period: date = PERIOD) -> dict[str, list[dict[str, str]]]:
    """Return one institution's rows of the four templates, collected (``CJRQ``) at the end of ``period``."""
    base = {"JRXKZH": f"L-{code}", "NBJGH": "001", "CJRQ": period.strftime("%Y%m%d")}
    rows: dict[str, list[dict[str, str]]] = {"EAST_DGKHXXB": [], "EAST_XDHTB": [], "EAST_DGXDYWJJB": [], "EAST_DBHTB": []}
    for index, number in enumerate(generator.sample(pool, customers)):
        customer = {"KHTYBH": f"{code}-{index:06d}", "KHMC": f"企业{number}"}
        contract_no = f"{code}-HT-{index:06d}"
        guarantee_no = f"{code}-DB-{index:06d}" if index % GUARANTEE_EVERY == 0 else None
        amount = f"{generator.randint(100_000, 50_000_000)}.00"
        rows["EAST_DGKHXXB"].append({**base, **customer, "ZJLX": "01", "ZJHM": _uscc(number)})
        rows["EAST_XDHTB"].append({**base, **customer, "HTH": contract_no, "BZ": "CNY", "HTJE": amount, "HTZT": "01",
                                   "DBHTH": guarantee_no})
        overdue = generator.random() < 0.05
        rows["EAST_DGXDYWJJB"].append({**base, **customer, "ZJLX": "01", "ZJHM": _uscc(number),
                                       "JJH": f"{code}-JJ-{index:06d}", "HTH": contract_no, "BZ": "CNY",
                                       "JJJE": amount, "JJYE": amount, "DKZT": "02" if overdue else "01",
                                       "YQTS": "40" if overdue else "0", "WJFL": "01"})
        if guarantee_no:
            rows["EAST_DBHTB"].append({**base, "DBHTH": guarantee_no, "BDBHTH": contract_no, "DBLX": "01",
                                       "DBRMC": "担保企业", "DBRZJLX": "01", "DBRZJHM": _uscc(generator.choice(pool)),
                                       "BZ": "CNY", "DBJE": amount, "DBHTZT": "01"})
    return rows


def phase_prepare(data_dir: Path, institutions: int, customers: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from intake.template_model import TemplateCatalog
    from intake.warehouse import load_submission
    from regsandbox_core.platform_keys import ensure_platform_keys
    from regsandbox_core.settings import Settings

    settings = Settings(data_dir=data_dir)
    codes = _codes(institutions)
    store = ensure_platform_keys(settings, codes, on_event=None)
    catalog = TemplateCatalog.load()
    generator = random.Random(SEED)
    pool = list(range(institutions * customers // LENDERS_PER_CUSTOMER))
    staged = data_dir / "staged.parquet"
    submission_id, rows_loaded = 0, 0
    for code in codes:
        for template, rows in _rows(code, pool, customers, generator).items():
            fields = [field.code for field in catalog.get(template).fields]
            pq.write_table(pa.table({name: pa.array([row.get(name) for row in rows], pa.string()) for name in fields}),
                           staged)
            submission_id += 1
            load_submission(settings, store, institution_code=code, template_code=template, template_version=1,
                            field_codes=fields, period_end=PERIOD, staged_path=staged, submission_id=submission_id,
                            version=1, raw_sm3=f"{submission_id:064d}").finish()
            rows_loaded += len(rows)
    staged.unlink()
    return {"partitions": submission_id, "rows": rows_loaded}


def phase_bare(data_dir: Path) -> dict:
    import duckdb

    from extracts.features import INPUT_TEMPLATES
    from extracts.sources import decrypt_intake, intake_tables
    from regsandbox_core.platform_keys import open_keystore
    from regsandbox_core.settings import Settings

    settings = Settings(data_dir=data_dir)
    store = open_keystore(settings)
    work = Path(tempfile.mkdtemp(dir=data_dir))
    started = time.perf_counter()
    files: dict[str, list[Path]] = {template: [] for template in INPUT_TEMPLATES}
    for folder in sorted((settings.warehouse_dir / "intake" / INPUT_TEMPLATES[0]).glob("institution=*")):
        code = folder.name.split("=", 1)[1]
        (work / code).mkdir()
        for table in intake_tables(settings, code):
            files[table.catalog_table].extend(decrypt_intake(store, code, table, work / code))
    decrypted = time.perf_counter()
    con = duckdb.connect()
    output_bytes = 0
    for template, paths in files.items():
        target = work / f"{template}.parquet"
        listing = "[" + ", ".join(f"'{path}'" for path in paths) + "]"
        con.sql(f"COPY (SELECT * FROM read_parquet({listing}, union_by_name=true)) TO '{target}' "
                "(FORMAT parquet, COMPRESSION zstd)")
        output_bytes += target.stat().st_size
    con.close()
    finished = time.perf_counter()
    shutil.rmtree(work)
    return {"decrypt_seconds": decrypted - started, "copy_seconds": finished - decrypted,
            "seconds": finished - started, "output_bytes": output_bytes}


def phase_features(data_dir: Path) -> dict:
    from extracts.builder import WORK_DIR_PREFIX
    from extracts.features import CrossInstitutionFeatures
    from extracts.policy import ensure_default_policy
    from regsandbox_core.platform_keys import open_keystore
    from regsandbox_core.settings import Settings

    settings = Settings(data_dir=data_dir)
    store = open_keystore(settings)
    policy = ensure_default_policy(settings, store)
    out = Path(tempfile.mkdtemp(dir=data_dir))
    with CrossInstitutionFeatures(settings, store, work_dir_prefix=WORK_DIR_PREFIX) as features:
        started = time.perf_counter()
        features._computed()  # noqa: SLF001 - the whole-warehouse computation is the phase being measured
        computed = time.perf_counter()
        plans = features.column_plans({}, policy)
        codes = sorted({code for (_template, code) in features._input_tables()})  # noqa: SLF001
        for code in codes:
            features.write_table(code, out / f"{code}.parquet", plans, store.current(code, "token").key)
        finished = time.perf_counter()
    output_bytes = sum(path.stat().st_size for path in out.iterdir())
    shutil.rmtree(out)
    return {"compute_seconds": computed - started, "slice_seconds": finished - computed, "institutions": len(codes),
            "seconds": finished - started, "output_bytes": output_bytes}


PHASES = {"prepare": phase_prepare, "bare": phase_bare, "features": phase_features}


def _run_phase(name: str, data_dir: Path, extra: list[str]) -> dict:
    result_file = data_dir / f"{name}.json"
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    child = subprocess.Popen([sys.executable, __file__, "--phase", name, "--data-dir", str(data_dir),
                              "--result", str(result_file), *extra], env=environment)
    _pid, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"phase {name} failed with status {status}")
    result = json.loads(result_file.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def _machine() -> list[str]:
    import duckdb

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {memory:.1f} GiB",
        f"- OS: {platform.platform()}; Python {platform.python_version()}; DuckDB {duckdb.__version__}",
    ]


def _report(arguments: argparse.Namespace, results: dict, load_before: tuple, load_after: tuple) -> str:
    prepare, bare, features = results["prepare"], results["bare"], results["features"]
    count = features["institutions"]
    lines = [
        "## Cross-institution features",
        "",
        "Measured by `benchmarks/extract_features.py`; this section is generated by it, so rerun the",
        "script instead of editing the figures by hand.",
        "",
        "### Machine and command",
        "",
        *_machine(),
        f"- Command: `.venv/bin/python benchmarks/extract_features.py --institutions {arguments.institutions} "
        f"--customers {arguments.customers}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Load average (1 min) {load_before[0]:.1f} before and {load_after[0]:.1f} after the run. Other work "
        "(test runs of other developers) shared the machine, so the figures are from one loaded run, not a best of several.",
        "",
        f"The warehouse holds {count} institutions × 4 templates = {prepare['partitions']:,} encrypted partitions with "
        f"{prepare['rows']:,} rows: {arguments.customers:,} corporate customers per institution drawn from a pool of "
        f"{count * arguments.customers // LENDERS_PER_CUSTOMER:,}, so about {LENDERS_PER_CUSTOMER} lenders per "
        f"customer, and a guarantee contract for every {GUARANTEE_EVERY}th customer.",
        "",
        "### Figures",
        "",
        "| Measurement | Time | Peak RSS of its process |",
        "|---|---:|---:|",
        f"| (a) bare read: decrypt every input partition, one DuckDB COPY per template to zstd Parquet | "
        f"{bare['seconds']:.1f} s (decryption {bare['decrypt_seconds']:.1f} s) | {bare['peak_rss_mib']:,.0f} MiB |",
        f"| (b) whole-warehouse feature set, computed once: decryption, SQL, guarantee graph | "
        f"{features['compute_seconds']:.1f} s | {features['peak_rss_mib']:,.0f} MiB (with the slices below) |",
        f"| (c) slices of all {count} institutions, key tokenised | {features['slice_seconds']:.1f} s "
        f"({features['slice_seconds'] / count * 1000:.0f} ms each) | (same process) |",
        "",
        f"- (b) / (a): **{features['compute_seconds'] / bare['seconds']:.2f}**. Computing once and slicing, (b) + (c), "
        f"took {features['seconds']:.1f} s. Recomputing the set for each institution would take about "
        f"{count} × (b) = {count * features['compute_seconds']:,.0f} s (an estimate from (b), not measured).",
        f"- Output sizes: (a) {bare['output_bytes'] / 2**20:,.1f} MiB, (c) {features['output_bytes'] / 2**20:,.1f} MiB.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=400, help="institutions in the warehouse (default 400)")
    parser.add_argument("--customers", type=int, default=500, help="corporate customers per institution (default 500)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.phase:
        extra = ({"institutions": arguments.institutions, "customers": arguments.customers}
                 if arguments.phase == "prepare" else {})
        result = PHASES[arguments.phase](arguments.data_dir, **extra)
        arguments.result.write_text(json.dumps(result))
        return 0

    load_before = os.getloadavg()
    data_dir = Path(tempfile.mkdtemp(prefix="rs-features-bench-", dir="/tmp"))
    try:
        os.chmod(data_dir, 0o700)
        scale = ["--institutions", str(arguments.institutions), "--customers", str(arguments.customers)]
        results = {"prepare": _run_phase("prepare", data_dir, scale)}
        for name in ("bare", "features"):
            results[name] = _run_phase(name, data_dir, [])
            print(name, results[name], flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    section = _report(arguments, results, load_before, os.getloadavg())
    if arguments.no_write:
        print(section)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report_page import write_section

        write_section("extract_features", section)
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
