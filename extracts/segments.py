"""Masked period segments: the unit of incremental rebuilds of intake tables.

The first build of an intake table masks all periods in one pass and keeps no segments. Later
builds split the table into period segments: each accepted period is masked into its own
Parquet segment, or cut from the previous table when its partition did not change, kept in
``extracts/<code>.builds/.segments/<table>/`` (0700, owner only) and named by the SM3 of everything
its content depends on: the partition's digest from its warehouse manifest, the policy digest,
the token key label and the classes of the table. The next build reuses every segment whose name
still matches and masks only new or changed periods; the table file is then the concatenation
of the segments in period order. A JSON sidecar beside each segment stores its column plans for
the manifest.

Segments hold masked data only, never raw values.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import duckdb

from extracts.masking import quote_literal
from extracts.publish import builds_dir
from extracts.sources import SourcePartition
from regsandbox_core.crypto import sm3_hex
from regsandbox_core.files import fsync_directory
from regsandbox_core.settings import Settings

SEGMENTS_DIR = ".segments"
SEGMENT_FORMAT = "regsandbox-extract-segment/1"


def segments_dir(settings: Settings, institution_code: str, table: str) -> Path:
    folder = builds_dir(settings, institution_code) / SEGMENTS_DIR / table
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder.parent, 0o700)
    return folder


def segment_name(base: dict, partition: SourcePartition) -> str:
    """Return the file name of a period's segment: period and SM3 of its inputs."""
    document = {"format": SEGMENT_FORMAT, **base, "partition": partition.manifest_entry()}
    digest = sm3_hex(json.dumps(document, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return f"{partition.period}-{digest[:32]}.parquet"


def ensure_segments(
    folder: Path,
    base: dict,
    partitions: tuple[SourcePartition, ...],
    mask: Callable[[SourcePartition, Path], tuple[list[dict], bool]],
) -> tuple[list[Path], list[dict], list[str]]:
    """Return the segments of ``partitions`` in order, their merged column entries and the periods masked now.

    ``mask(partition, target)`` writes the segment of one partition to ``target`` and returns its
    column entries and whether it masked warehouse data (False when it cut the segment from the
    previous table). A segment is written under a temporary name and renamed into place.
    """
    segments: list[Path] = []
    columns: dict[str, dict] = {}
    rebuilt: list[str] = []
    for partition in partitions:
        path = folder / segment_name(base, partition)
        sidecar = path.with_suffix(".json")
        if not (path.is_file() and sidecar.is_file()):
            temporary = path.with_name(f".{path.name}.tmp")
            entries, masked = mask(partition, temporary)
            sidecar.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
            os.replace(temporary, path)
            fsync_directory(folder)
            if masked:
                rebuilt.append(partition.period or "")
        for entry in json.loads(sidecar.read_text("utf-8")):
            columns.setdefault(entry["name"], entry)
        segments.append(path)
    return segments, list(columns.values()), rebuilt


def concatenate(segments: list[Path], target: Path, spill_dir: Path) -> None:
    """Write the rows of ``segments`` in order to ``target``; one segment is hard-linked instead."""
    if len(segments) == 1:
        os.link(segments[0], target)
        return
    con = duckdb.connect(":memory:")
    try:
        con.sql(f"SET temp_directory={quote_literal(str(spill_dir))}")
        # A plain scan keeps the order of the files and of their rows when insertion order is
        # preserved (DuckDB's default, set here explicitly), so no sort is needed.
        con.sql("SET preserve_insertion_order=true")
        files = "[" + ", ".join(quote_literal(str(path)) for path in segments) + "]"
        con.sql(f"COPY (SELECT * FROM read_parquet({files}, union_by_name=true)) "
                f"TO {quote_literal(str(target))} (FORMAT parquet, COMPRESSION zstd)")
    finally:
        con.close()


def cut_period(table: Path, period: str, target: Path, spill_dir: Path) -> None:
    """Write the rows of one period (column ``_period``) of a previous masked table to ``target``, in order."""
    con = duckdb.connect(":memory:")
    try:
        con.sql(f"SET temp_directory={quote_literal(str(spill_dir))}")
        con.sql("SET preserve_insertion_order=true")
        con.sql(f"COPY (SELECT * FROM read_parquet({quote_literal(str(table))}) WHERE _period = {quote_literal(period)}) "
                f"TO {quote_literal(str(target))} (FORMAT parquet, COMPRESSION zstd)")
    finally:
        con.close()


def prune(folder: Path, keep: list[Path]) -> None:
    """Delete the segments and sidecars of ``folder`` that the current build does not use."""
    wanted = {path.name for path in keep} | {path.with_suffix(".json").name for path in keep}
    for path in folder.iterdir():
        if path.name not in wanted:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
