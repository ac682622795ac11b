"""The SM3 hash chain of the audit log: computing it on every insert and verifying it.

Each ``audit_events`` row stores ``prev_sm3`` (the ``chain_sm3`` of the row before it, or
:data:`GENESIS_SM3` for the first row) and ``chain_sm3 = SM3(prev_sm3 || canonical content)``, where
``prev_sm3`` is the 64 hex characters in ASCII and the canonical content is the JSON array built by
:func:`canonical_content`. An edited row no longer matches its own digest. A deleted row breaks the
link of the next one, and deleted newest rows leave the ``audit_chain_head`` row pointing past the end.

Every insert goes through :func:`append_to_chain`, which a ``before_flush`` listener on every
SQLAlchemy :class:`~sqlalchemy.orm.Session` calls for the new :class:`AuditEvent` objects, so
``add_event``, ``record_event``, ``record_operator_event``, the append route and any direct
``session.add(AuditEvent(...))`` are chained alike. The listener first updates the head row, which
takes the row lock on PostgreSQL and the database write lock on SQLite, and holds it until the
transaction ends. So concurrent writers extend one chain, one after the other, and ids are assigned
here (head id + 1) rather than by the database sequence, because a rolled-back sequence value would
leave a gap.

The chain shows edits and deletions made without recomputing the digests. Someone with write access
to the database who recomputes every later digest and the head row is detected only by the SM2-signed
checkpoints of :mod:`admin_api.audit_checkpoint`, and only for rows up to the newest checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from admin_api.db import SQLITE_BUSY_TIMEOUT_SECONDS, utc_now
from admin_api.models import AuditChainHead, AuditEvent
from regsandbox_core.crypto import sm3_hex

GENESIS_SM3 = "0" * 64
"""``prev_sm3`` of the first audit event."""

HEAD_ID = 1
VERIFY_BATCH_ROWS = 1000


class AuditChainError(RuntimeError):
    """The chain head row is missing, so events cannot be chained (database not migrated)."""


def canonical_content(row: Any) -> bytes:
    """Return the bytes of ``row`` that its digest covers: a compact UTF-8 JSON array of its fields.

    ``row`` is an :class:`AuditEvent` or a result row of the ``audit_events`` columns.
    The time is UTC ISO 8601 with microseconds, which SQLite and PostgreSQL both store exactly.
    """
    occurred_at = row.occurred_at.astimezone(UTC).isoformat(timespec="microseconds")
    fields = [
        occurred_at, row.actor, row.role, row.institution_code, row.source_ip, row.action, row.resource,
        row.outcome, row.detail, row.request_id, row.recorded_by, row.id,
    ]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def chain_digest(prev_sm3: str, row: Any) -> str:
    """Return ``SM3(prev_sm3 || canonical_content(row))`` as 64 lowercase hex characters."""
    return sm3_hex(prev_sm3.encode("ascii") + canonical_content(row))


def append_to_chain(session: Session, events: Iterable[AuditEvent]) -> None:
    """Assign id, ``prev_sm3`` and ``chain_sm3`` to new ``events`` in order and advance the head row.

    Runs inside the session's transaction: the lock taken on the head row is released at commit or
    rollback, and a rollback also undoes the head update.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # Without a bound, a second session of the same thread (record_event while the request session
        # holds the head lock) would wait forever. 15 s matches SQLite's busy timeout in admin_api.db.
        connection.execute(text(f"SET LOCAL lock_timeout = '{SQLITE_BUSY_TIMEOUT_SECONDS}s'"))
    # An UPDATE is the first statement so the lock is held before the head is read: a row lock on
    # PostgreSQL, and on SQLite the write lock (pysqlite opens the transaction at the first write).
    locked = connection.execute(text("UPDATE audit_chain_head SET last_id = last_id WHERE id = :id"),
                                {"id": HEAD_ID})
    if locked.rowcount != 1:
        raise AuditChainError("audit_chain_head has no row; run the admin database migrations")
    last_id, prev_sm3 = connection.execute(
        text("SELECT last_id, last_sm3 FROM audit_chain_head WHERE id = :id"), {"id": HEAD_ID}
    ).one()

    for row in events:
        last_id += 1
        row.id = last_id
        if row.occurred_at is None:
            row.occurred_at = utc_now()
        row.occurred_at = row.occurred_at.astimezone(UTC)
        row.prev_sm3 = prev_sm3
        row.chain_sm3 = chain_digest(prev_sm3, row)
        prev_sm3 = row.chain_sm3

    connection.execute(
        text("UPDATE audit_chain_head SET last_id = :last_id, last_sm3 = :last_sm3 WHERE id = :id"),
        {"last_id": last_id, "last_sm3": prev_sm3, "id": HEAD_ID},
    )


@event.listens_for(Session, "before_flush")
def _chain_new_events(session: Session, _flush_context: object, _instances: object) -> None:
    new_events = [item for item in session.new if isinstance(item, AuditEvent)]
    if new_events:
        append_to_chain(session, new_events)


# --- verification ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainVerification:
    """Result of :func:`verify_chain`. ``code`` and ``message`` describe the first break, if any."""

    intact: bool
    rows: int
    """Rows checked before the walk stopped."""
    last_id: int | None
    broken_id: int | None = None
    code: str | None = None
    message: str = ""


def _missing(first: int, last: int) -> str:
    return f"编号 {first}" if first == last else f"编号 {first} 至 {last}"


def verify_chain(session: Session, batch_rows: int = VERIFY_BATCH_ROWS) -> ChainVerification:
    """Walk ``audit_events`` in id order and return the first row whose link or digest is wrong.

    The head row is read first and the walk stops at its id, so events appended meanwhile are left
    for the next run. Rows are read ``batch_rows`` at a time by keyset paging as plain rows, not ORM
    objects, so memory stays bounded on large logs. A gap in ids is reported only where the link is
    also broken, because rows chained by the migration may have gaps left by rolled-back PostgreSQL
    sequence values.
    """
    head = session.execute(
        select(AuditChainHead.last_id, AuditChainHead.last_sm3).where(AuditChainHead.id == HEAD_ID)
    ).one_or_none()
    if head is None:
        return ChainVerification(False, 0, None, None, "audit_chain_head_missing",
                                 "审计日志链头记录缺失，无法检查审计日志。请先运行数据库迁移。")
    head_id, head_sm3 = head

    columns = AuditEvent.__table__.columns
    prev_sm3 = GENESIS_SM3
    last_id = 0
    rows = 0
    while True:
        batch = session.execute(
            select(*columns).where(columns.id > last_id, columns.id <= head_id).order_by(columns.id).limit(batch_rows)
        ).all()
        for row in batch:
            if row.prev_sm3 != prev_sm3:
                if row.id > last_id + 1:
                    return ChainVerification(
                        False, rows, last_id or None, last_id + 1, "audit_chain_row_missing",
                        f"审计日志链断裂：{_missing(last_id + 1, row.id - 1)} 的审计事件缺失（已被删除），"
                        f"编号 {row.id} 的事件不再与前一事件相连。",
                    )
                return ChainVerification(
                    False, rows, last_id or None, row.id, "audit_chain_link_broken",
                    f"审计日志链断裂：编号 {row.id} 的事件记录的前一摘要与编号 {last_id or '（无）'} 的事件不符，"
                    "可能有事件被删除或摘要被修改。",
                )
            if row.chain_sm3 != chain_digest(prev_sm3, row):
                return ChainVerification(
                    False, rows, last_id or None, row.id, "audit_chain_row_modified",
                    f"审计日志链断裂：编号 {row.id} 的事件内容与其 SM3 摘要不符，该事件写入后被修改。",
                )
            prev_sm3 = row.chain_sm3
            last_id = row.id
            rows += 1
        if len(batch) < batch_rows:
            break

    if head_id > last_id:
        return ChainVerification(
            False, rows, last_id or None, last_id + 1, "audit_chain_row_missing",
            f"审计日志链断裂：{_missing(last_id + 1, head_id)} 的审计事件缺失（已被删除），"
            f"链头记录的最新事件是编号 {head_id}。",
        )
    if head_sm3 != prev_sm3:
        return ChainVerification(
            False, rows, last_id or None, last_id or None, "audit_chain_head_mismatch",
            f"审计日志链头记录与最后一条事件（编号 {last_id}）的摘要不符，链头记录或该事件被修改。",
        )
    return ChainVerification(True, rows, last_id or None, message=f"审计日志链完整：共 {rows} 条事件。")
