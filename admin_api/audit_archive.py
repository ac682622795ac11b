"""Archive files of audit events older than the retention period, for the operator to keep offline.

An archive is JSON Lines: a header object, then one object per event in id order with every column,
including ``prev_sm3`` and ``chain_sm3``. :func:`check_archive` recomputes the chain inside the file,
and ``regsandbox verify`` checks the SM2 signature beside it (``<file>.sig``, kind ``audit_archive``).
Archiving copies events and never deletes them, so ``regsandbox audit verify`` stays intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.audit_chain import chain_digest
from admin_api.models import AuditEvent
from regsandbox_core.files import atomic_output

ARCHIVE_FORMAT = "regsandbox-audit-archive/1"
SIGNATURE_KIND = "audit_archive"
_BATCH_ROWS = 1000
_FIELDS = ("id", "occurred_at", "request_id", "actor", "role", "institution_code", "source_ip", "action",
           "resource", "outcome", "detail", "recorded_by", "prev_sm3", "chain_sm3")


@dataclass(frozen=True)
class ArchiveSummary:
    rows: int
    first_id: int | None
    last_id: int | None
    cutoff: str


def _event_object(row: Any) -> dict[str, Any]:
    item = {name: getattr(row, name) for name in _FIELDS}
    item["occurred_at"] = row.occurred_at.astimezone(UTC).isoformat(timespec="microseconds")
    return item


def write_archive(session: Session, path: Path, cutoff: datetime, retention_days: int) -> ArchiveSummary:
    """Write every event that occurred before ``cutoff`` to a new archive file at ``path`` (mode 0600).

    The file appears only when complete. Rows are read in batches of ids, so memory stays bounded.
    """
    columns = AuditEvent.__table__.columns
    cutoff_text = cutoff.astimezone(UTC).isoformat(timespec="microseconds")
    rows = 0
    first_id: int | None = None
    last_id = 0
    with atomic_output(path) as stream:
        header = {"format": ARCHIVE_FORMAT, "cutoff": cutoff_text, "retention_days": retention_days}
        stream.write((json.dumps(header, ensure_ascii=False) + "\n").encode("utf-8"))
        while True:
            batch = session.execute(
                select(*columns).where(columns.id > last_id, columns.occurred_at < cutoff)
                .order_by(columns.id).limit(_BATCH_ROWS)
            ).all()
            for row in batch:
                stream.write((json.dumps(_event_object(row), ensure_ascii=False) + "\n").encode("utf-8"))
                first_id = row.id if first_id is None else first_id
                last_id = row.id
                rows += 1
            if len(batch) < _BATCH_ROWS:
                break
    return ArchiveSummary(rows, first_id, last_id or None, cutoff_text)


def check_archive(path: Path) -> int:
    """Recompute the chain of every event in the archive at ``path``; return the number of events.

    Raise ValueError with a Chinese message naming the first event whose digest or link is wrong.
    Events of an archive are consecutive in the chain only if none newer than ``cutoff`` came in
    between, so a link is checked only between events whose ids follow each other.
    """
    with open(path, encoding="utf-8") as stream:
        header = json.loads(stream.readline())
        if header.get("format") != ARCHIVE_FORMAT:
            raise ValueError(f"文件 {path} 不是审计日志归档（格式应为 {ARCHIVE_FORMAT}）。")
        count = 0
        previous: dict[str, Any] | None = None
        for line in stream:
            item = json.loads(line)
            row = SimpleNamespace(**{**item, "occurred_at": datetime.fromisoformat(item["occurred_at"])})
            if row.chain_sm3 != chain_digest(row.prev_sm3, row):
                raise ValueError(f"归档中编号 {row.id} 的事件内容与其 SM3 摘要不符，归档文件被修改。")
            if previous is not None and previous["id"] + 1 == row.id and previous["chain_sm3"] != row.prev_sm3:
                raise ValueError(f"归档中编号 {row.id} 的事件与编号 {previous['id']} 的事件不相连，归档文件被修改。")
            previous = item
            count += 1
    return count
