"""Warehouse tables that feed an institution's extract, and their decryption into a private work folder.

Two kinds of source exist:

- intake tables: the accepted report data of :mod:`intake.warehouse`, one encrypted partition per
  template, institution and period, each with a manifest (submission, version, SM3 of the
  partition ciphertext). The extract table is named after the template code in lower case.
- the demo ``applications`` table of :mod:`extracts.warehouse` (one partition per institution),
  which the walking skeleton builds.

A source's ``partitions`` record what each extract manifest stores about its input, so the next
build can tell which tables changed without decrypting anything.
"""

from __future__ import annotations

import io
import re
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from extracts.warehouse import APPLICATIONS_TABLE, read_partition, warehouse_institutions, warehouse_partition_file
from intake import warehouse as intake_warehouse
from regsandbox_core.crypto import sm3_hex
from regsandbox_core.documents import decrypt_document
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import write_private_file
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

SOURCE_INTAKE = "intake"
SOURCE_DEMO = "demo"
_PERIOD_FOLDER = re.compile(r"^period=([0-9]{8})$")
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ExtractSourceError(RegsandboxError):
    """A warehouse partition that an extract needs is missing, unreadable or does not decrypt."""

    status = 500


@dataclass(frozen=True)
class SourcePartition:
    """One input partition of an extract table, as recorded in the extract manifest."""

    period: str | None
    path: Path
    partition_sm3: str
    submission_id: int | None = None
    version: int | None = None
    rows: int | None = None
    key_version: int | None = None

    def manifest_entry(self) -> dict:
        return {"period": self.period, "partition_sm3": self.partition_sm3, "submission_id": self.submission_id,
                "version": self.version, "rows": self.rows, "key_version": self.key_version}


@dataclass(frozen=True)
class SourceTable:
    """A warehouse table of one institution: extract table name, catalog table name and partitions."""

    name: str
    catalog_table: str
    kind: str
    partitions: tuple[SourcePartition, ...]


def extract_table_name(template_code: str) -> str:
    """Return the extract table name of a template: lower case, ``.`` and ``-`` as ``_``, ``t_`` before a digit."""
    name = re.sub(r"[^a-z0-9_]", "_", template_code.lower())
    if not name[:1].isalpha() and not name.startswith("_"):
        name = f"t_{name}"
    return name[:63]


def intake_tables(settings: Settings, institution_code: str,
                  accepted_ids: Mapping[str, Collection[int]] | None = None) -> list[SourceTable]:
    """Return the intake templates with accepted partitions of the institution, from their manifests.

    With ``accepted_ids`` (template code -> accepted submission ids), a partition whose manifest
    names another submission is left out, as :func:`intake.warehouse.decrypt_accepted` does. A
    partition folder without a readable manifest is left out too, since nothing records its content.
    """
    root = settings.warehouse_dir / intake_warehouse.INTAKE_TABLE_DIR
    if not root.is_dir():
        return []
    tables: list[SourceTable] = []
    names: dict[str, str] = {}
    for template_dir in sorted(root.iterdir()):
        top = template_dir / f"institution={institution_code}"
        if not top.is_dir():
            continue
        partitions = []
        for folder in sorted(top.iterdir()):
            match = _PERIOD_FOLDER.match(folder.name)
            manifest = intake_warehouse.read_manifest(folder) if match else None
            if manifest is None or not (folder / intake_warehouse.PARTITION_NAME).is_file():
                continue
            if accepted_ids is not None and manifest.submission_id not in accepted_ids.get(template_dir.name, ()):
                continue
            partitions.append(SourcePartition(match.group(1), folder / intake_warehouse.PARTITION_NAME,
                                              manifest.partition_sm3, manifest.submission_id, manifest.version,
                                              manifest.rows, manifest.key_version))
        if not partitions:
            continue
        name = extract_table_name(template_dir.name)
        if name in names or name == APPLICATIONS_TABLE or not _TABLE_NAME.match(name):
            raise ExtractSourceError(
                "EXTRACT_TABLE_NAME_CLASH",
                f"报表模板 {template_dir.name} 的数据提取表名 {name} 与模板 {names.get(name, APPLICATIONS_TABLE)} 冲突或无效。"
                "请联系平台管理员调整报表模板代码。",
            )
        names[name] = template_dir.name
        tables.append(SourceTable(name, template_dir.name, SOURCE_INTAKE, tuple(partitions)))
    return tables


def demo_table(settings: Settings, institution_code: str) -> SourceTable | None:
    """Return the demo ``applications`` table of the institution, or None when the demo data is not loaded."""
    if institution_code not in warehouse_institutions(settings):
        return None
    path = warehouse_partition_file(settings, institution_code)
    # The digest is filled in by decrypt_sources, from the decrypted Parquet bytes, because a
    # build may migrate or re-encrypt this partition, which changes its ciphertext but not its rows.
    return SourceTable(APPLICATIONS_TABLE, APPLICATIONS_TABLE, SOURCE_DEMO, (SourcePartition(None, path, ""),))


def decrypt_demo(settings: Settings, store: KeyStore, institution_code: str, work_dir: Path) -> tuple[Path, str]:
    """Decrypt the demo partition into ``work_dir`` and return the file and the SM3 of its Parquet bytes."""
    frame = read_partition(settings, store, institution_code)
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    data = buffer.getvalue()
    target = work_dir / f"{APPLICATIONS_TABLE}.parquet"
    write_private_file(target, data)
    return target, sm3_hex(data)


def decrypt_partition(store: KeyStore, institution_code: str, table: SourceTable, partition: SourcePartition,
                      work_dir: Path) -> Path:
    """Decrypt one partition of an intake table into ``work_dir``; raise :class:`ExtractSourceError` on any failure."""
    target = work_dir / f"{table.name}.{partition.period}.parquet"
    associated = intake_warehouse.partition_associated_data(table.catalog_table, institution_code,
                                                             partition.period or "")
    try:
        decrypt_document(store, institution_code, partition.path, target, associated)
    except RegsandboxError as error:
        target.unlink(missing_ok=True)
        raise ExtractSourceError(
            "EXTRACT_PARTITION_UNREADABLE",
            f"报表 {table.catalog_table} {partition.period} 的数据仓库分区 {partition.path} 无法解密（{error.code}：{error.message}），"
            "未生成数据提取，原有提取保持不变。请检查机构数据密钥状态，或重新审核通过该期报送。",
        ) from error
    except OSError as error:
        target.unlink(missing_ok=True)
        raise ExtractSourceError(
            "EXTRACT_PARTITION_UNREADABLE",
            f"无法读取数据仓库分区 {partition.path}（{error.strerror}），未生成数据提取，原有提取保持不变。",
        ) from error
    return target


def decrypt_intake(store: KeyStore, institution_code: str, table: SourceTable, work_dir: Path) -> list[Path]:
    """Decrypt every partition of an intake table into ``work_dir``; raise :class:`ExtractSourceError` on any failure.

    Unlike a validation, which may skip a damaged period, an extract must not silently lose one.
    """
    return [path for batch in decrypted_batches(store, institution_code, table, work_dir) for path in batch]


def decrypted_batches(store: KeyStore, institution_code: str, table: SourceTable,
                      work_dir: Path) -> Iterator[list[Path]]:
    """Yield the decrypted file of the first partition of ``table``, then those of all others, in order.

    A worker thread decrypts one partition after another without waiting for the caller. So the
    caller's work on the first file (DuckDB, which releases the GIL, and hashing in Python)
    overlaps with the decryption of the others. The first partition usually contains most of a
    table's distinct customers. One step for all the others cost less than one per partition in
    benchmarks/extract_build.py. All files are written to ``work_dir`` anyway, so running ahead
    costs no memory. The first failure is raised when its batch is reached. Partitions not yet
    started are then cancelled. The files decrypted before stay in ``work_dir``, which the caller
    deletes.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-decrypt") as pool:
        pending = deque(pool.submit(decrypt_partition, store, institution_code, table, partition, work_dir)
                        for partition in table.partitions)
        try:
            if pending:
                yield [pending.popleft().result()]
            if pending:
                yield [pending.popleft().result() for _ in range(len(pending))]
        finally:
            for future in pending:
                future.cancel()
