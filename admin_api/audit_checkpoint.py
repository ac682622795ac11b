"""SM2-signed checkpoints of the audit chain head, kept outside the database.

The SM3 chain shows a row edited or deleted without recomputing the digests. Someone with write
access to the database could still recompute every later digest and the head row. A checkpoint
closes that gap up to its position: it records the id and ``chain_sm3`` of the newest event, is
signed with the platform's SM2 key (which the database does not hold) and is written as a file
under ``<data_dir>/audit/checkpoints/``. :func:`verify_checkpoints` then checks that each
checkpointed row still exists with the same digest, so a rewritten or truncated chain before the
newest checkpoint is reported. Rows written after the newest checkpoint are covered by the chain only.

admin_api writes a checkpoint every ``audit_checkpoint_minutes`` while it runs, and
``regsandbox audit checkpoint`` writes one on demand.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from admin_api.audit_chain import HEAD_ID
from admin_api.models import AuditChainHead, AuditEvent
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import write_private_file
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, TrustedKeys, sign_object, verify_object

log = logging.getLogger("regsandbox.audit_checkpoint")

CHECKPOINT_KIND = "audit_checkpoint"


def checkpoint_dir(settings: Settings) -> Path:
    return settings.data_dir / "audit" / "checkpoints"


def checkpoint_files(settings: Settings) -> list[Path]:
    folder = checkpoint_dir(settings)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def write_checkpoint(session: Session, settings: Settings, keystore: KeyStore) -> Path | None:
    """Sign the current chain head and write it as ``<last_id>.json``; return the path, or None when unchanged.

    Raises RegsandboxError when the platform signing key is unusable, and OSError when the folder
    is not writable; nothing is written then.
    """
    head = session.execute(
        select(AuditChainHead.last_id, AuditChainHead.last_sm3).where(AuditChainHead.id == HEAD_ID)
    ).one_or_none()
    if head is None or head.last_id == 0:
        return None
    path = checkpoint_dir(settings) / f"{head.last_id:012d}.json"
    if path.exists():
        return None
    envelope = sign_object(keystore, CHECKPOINT_KIND, {"last_id": head.last_id, "last_sm3": head.last_sm3})
    write_private_file(path, json.dumps(envelope, ensure_ascii=False, indent=2).encode("utf-8"))
    log.info("audit checkpoint written at event %s", head.last_id)
    return path


@dataclass(frozen=True)
class CheckpointVerification:
    intact: bool
    checked: int
    newest_id: int | None
    code: str | None = None
    message: str = ""


def verify_checkpoints(session: Session, settings: Settings, trusted: TrustedKeys) -> CheckpointVerification:
    """Check every checkpoint file's signature and that its event still exists with the signed digest."""
    checked = 0
    newest: int | None = None
    for path in checkpoint_files(settings):
        try:
            verified = verify_object(json.loads(path.read_text(encoding="utf-8")), trusted)
            if verified.kind != CHECKPOINT_KIND:
                raise SignatureInvalid(f"签名对象类型为 {verified.kind}，不是审计检查点。")
            last_id, last_sm3 = int(verified.payload["last_id"]), str(verified.payload["last_sm3"])
        except (OSError, ValueError, KeyError, TypeError, RegsandboxError) as error:
            reason = getattr(error, "message", None) or type(error).__name__
            return CheckpointVerification(
                False, checked, newest, "audit_checkpoint_signature_invalid",
                f"审计检查点文件 {path} 无法验证：{reason}。请从备份恢复该文件，或核查是否被篡改。",
            )
        stored = session.scalars(select(AuditEvent.chain_sm3).where(AuditEvent.id == last_id)).first()
        if stored is None:
            return CheckpointVerification(
                False, checked, newest, "audit_checkpoint_row_missing",
                f"审计检查点 {path.name} 签名确认的编号 {last_id} 的审计事件已不存在：审计日志被截断或删除。",
            )
        if stored != last_sm3:
            return CheckpointVerification(
                False, checked, newest, "audit_checkpoint_mismatch",
                f"编号 {last_id} 的审计事件摘要与已签名的审计检查点 {path.name} 不符：该事件及其之前的哈希链被重新计算过。",
            )
        checked += 1
        newest = last_id
    message = (f"已核对 {checked} 个已签名的审计检查点，最新检查点位于编号 {newest} 的事件。" if checked
               else "尚无审计检查点（管理服务运行后按设置的间隔生成）。")
    return CheckpointVerification(True, checked, newest, None, message)


class CheckpointWriter:
    """A daemon thread of admin_api that writes a checkpoint every ``interval`` seconds until stopped."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, keystore: KeyStore,
                 interval: float) -> None:
        self._sessions = sessions
        self._settings = settings
        self._keystore = keystore
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint", daemon=True)

    def start(self) -> None:
        log.info("audit checkpoint writer started, every %.0f s", self._interval)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        log.info("audit checkpoint writer stopped")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._sessions() as session:
                    write_checkpoint(session, self._settings, self._keystore)
            except Exception as error:  # noqa: BLE001  # the writer keeps running; the next interval retries
                log.error("audit checkpoint failed, retrying in %.0f s: %s: %s", self._interval,
                          type(error).__name__, getattr(error, "code", error))
