"""Decrypting downloads of archived report files, shared by the API and the console.

A report run's archive folder contains ``<name>.rssg`` files encrypted under a ``platform/data`` key
version and ``manifest.json`` with its detached SM2 signature ``manifest.json.sig`` (see
:mod:`reporting.archive`). A download of ``<name>``:

1. verifies the manifest's signature over the exact bytes it then parses;
2. accepts only a name that the manifest lists (any other name, including path tricks, is 404);
3. decrypts the ciphertext into a private temporary file, all-or-nothing, with the key version
   the file's header names;
4. compares the plaintext's size and SM3 with the manifest;
5. opens the file, deletes it from disk and streams the open file as an attachment.

A failure at any step returns its own code with a Chinese message, is audited as
``report.download`` with outcome ``failed``, and sends no plaintext.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from admin_api.audit import add_event, record_event
from admin_api.errors import ApiError, not_found
from admin_api.keyaccess import request_keystore
from admin_api.models import ReportRun
from admin_api.security import Principal
from regsandbox_core.crypto import sm3_file, sm3_hex
from regsandbox_core.documents import DocumentKeyIdInvalid, DocumentOwnerMismatch, decrypt_document
from regsandbox_core.keystore import PLATFORM_OWNER, KeyDestroyed, KeyNotActive, KeyRevoked, KeyStore, KeyVersionUnknown
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, read_envelope, signature_path, verify_object
from regsandbox_core.streaming import (
    CiphertextTampered,
    CiphertextTrailingData,
    CiphertextTruncated,
    StreamFormatInvalid,
    WrongKey,
)
from reporting.archive import ENCRYPTED_SUFFIX, MANIFEST_KIND, MANIFEST_NAME, file_associated_data

logger = logging.getLogger(__name__)

AUDIT_ACTION = "report.download"
_DOWNLOADS_FOLDER = ".downloads"
_STALE_SECONDS = 3600
_CHUNK = 64 * 1024
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".ipynb": "application/x-ipynb+json",
    ".log": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


def _conflict(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=409)


@dataclass(frozen=True)
class _ManifestEntry:
    name: str
    size: int
    sm3: str
    ciphertext: str
    key: str


def archived_file_names(settings: Settings, run: ReportRun) -> list[str]:
    """Return the file names that a run's manifest lists, for links, or [] when there is no readable manifest.

    Nothing is verified here, because the download verifies the signature before it decrypts.
    """
    folder = _archive_folder(settings, run)
    if folder is None:
        return []
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, dict):
        return []
    return sorted(name for name in files if isinstance(name, str) and _FILE_NAME.match(name))


def _archive_folder(settings: Settings, run: ReportRun) -> Path | None:
    if not run.archive_path:
        return None
    root = settings.reports_dir.resolve()
    folder = Path(run.archive_path).resolve()
    if not folder.is_relative_to(root) or folder == root or not folder.is_dir():
        return None
    return folder


def download_report_file(request: Request, session: Session, caller: Principal, run_id: int, name: str) -> StreamingResponse:
    """Return a streaming response with the decrypted file ``name`` of run ``run_id``; audit the outcome."""
    # An invalid name may hold control characters (even NUL, which PostgreSQL text rejects), so it is escaped.
    resource = f"report_run:{run_id}/{name if _FILE_NAME.match(name) else ascii(name[:128])}"
    try:
        response, detail = _download(request, session, run_id, name)
    except ApiError as error:
        session.rollback()
        logger.warning("report download run %s file %r failed: %s", run_id, name[:128], error.code)
        record_event(request, caller, AUDIT_ACTION, resource, "failed", {"code": error.code})
        raise
    add_event(session, request, caller, AUDIT_ACTION, resource, "success", detail)
    session.commit()
    return response


def _download(request: Request, session: Session, run_id: int, name: str) -> tuple[StreamingResponse, dict[str, Any]]:
    settings: Settings = request.app.state.settings
    run = session.get(ReportRun, run_id)
    if run is None:
        raise not_found("RUN_NOT_FOUND", f"报告运行 {run_id} 不存在。")
    folder = _archive_folder(settings, run)
    if folder is None:
        raise not_found(
            "REPORT_ARCHIVE_NOT_FOUND",
            f"报告运行 {run_id} 没有可下载的归档（状态 {run.status}）。只有已结束并归档的运行才有文件。",
        )
    if not _FILE_NAME.match(name):
        raise _file_not_found(run_id, name)

    store = request_keystore(request)
    entry = _manifest_entry(store, folder, run_id, name)
    encrypted = folder / entry.ciphertext
    if not encrypted.is_file():
        raise _conflict(
            "REPORT_FILE_MISSING",
            f"报告运行 {run_id} 的清单列有文件 {name}，但加密文件 {entry.ciphertext} 不存在。请联系系统管理员检查报告归档。",
        )
    handle = _decrypt_verified(settings, store, encrypted, entry, run_id)
    headers = {
        "Content-Disposition": f"attachment; filename=\"{name}\"; filename*=UTF-8''{quote(name)}",
        "Content-Length": str(entry.size),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
    media_type = _CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
    response = StreamingResponse(_chunks(handle), media_type=media_type, headers=headers)
    return response, {"name": name, "size": entry.size, "key": entry.key}


def _file_not_found(run_id: int, name: str) -> ApiError:
    return not_found(
        "REPORT_FILE_NOT_FOUND",
        f"报告运行 {run_id} 的归档清单中没有文件 {name[:128]!r}。请使用运行记录中列出的文件名，例如 report.html。",
    )


def _manifest_entry(store: KeyStore, folder: Path, run_id: int, name: str) -> _ManifestEntry:
    """Verify the manifest signature over the bytes read once, then return the entry of ``name``."""
    manifest_path = folder / MANIFEST_NAME
    signature = signature_path(manifest_path)
    try:
        content = manifest_path.read_bytes()
    except OSError:
        raise _conflict("REPORT_MANIFEST_MISSING", f"报告运行 {run_id} 的归档缺少清单 {MANIFEST_NAME}，无法确认文件完整性。") from None
    if not signature.is_file():
        raise _conflict(
            "REPORT_MANIFEST_UNSIGNED",
            f"报告运行 {run_id} 的清单没有签名文件 {signature.name}，无法确认清单未被修改，已拒绝下载。",
        )
    try:
        verified = verify_object(read_envelope(signature), store)
        signed = verified.payload.get("file")
        if verified.kind != MANIFEST_KIND or not isinstance(signed, dict):
            raise SignatureInvalid(f"签名类型为 {verified.kind}，不是报告清单签名（{MANIFEST_KIND}）。")
        if signed.get("size") != len(content) or signed.get("sm3") != sm3_hex(content):
            raise SignatureInvalid("清单内容的大小或 SM3 杂凑值与签名记录不一致，清单在签名后被修改。")
    except SignatureInvalid as error:
        raise _conflict("REPORT_MANIFEST_INVALID", f"报告运行 {run_id} 的清单签名验证失败，已拒绝下载。{error.message}") from None

    try:
        files = json.loads(content).get("files")
    except (ValueError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise _conflict("REPORT_MANIFEST_INVALID", f"报告运行 {run_id} 的清单没有 files 列表，无法下载。")
    raw = files.get(name)
    if raw is None:
        raise _file_not_found(run_id, name)
    try:
        entry = _ManifestEntry(name, raw["size"], raw["sm3"], raw["ciphertext"], raw["key"])
    except (KeyError, TypeError):
        entry = None
    if (entry is None or not isinstance(entry.size, int) or not isinstance(entry.sm3, str)
            or entry.ciphertext != name + ENCRYPTED_SUFFIX or not isinstance(entry.key, str)):
        raise _conflict("REPORT_MANIFEST_INVALID", f"报告运行 {run_id} 的清单中文件 {name} 的记录不完整或无效。")
    return entry


def _downloads_dir(settings: Settings) -> Path:
    """Return the private folder of decrypted temporary files and delete leftovers older than an hour."""
    folder = settings.reports_dir / _DOWNLOADS_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    cutoff = time.time() - _STALE_SECONDS
    for leftover in folder.iterdir():
        try:
            if leftover.lstat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue
    return folder


def _decrypt_verified(settings: Settings, store: KeyStore, encrypted: Path, entry: _ManifestEntry,
                      run_id: int) -> BinaryIO:
    """Decrypt into a private temporary file, check it against the manifest and return it open and unlinked."""
    workspace = Path(tempfile.mkdtemp(prefix="download-", dir=_downloads_dir(settings)))
    plaintext = workspace / "plaintext"
    try:
        try:
            document = decrypt_document(store, PLATFORM_OWNER, encrypted, plaintext, file_associated_data(entry.name))
        except KeyDestroyed:
            raise ApiError(
                "REPORT_KEY_DESTROYED",
                f"报告文件 {entry.name} 由密钥 {entry.key} 加密，该密钥已销毁，文件无法再解密。",
                status=410,
            ) from None
        except KeyRevoked:
            raise _conflict(
                "REPORT_KEY_REVOKED",
                f"报告文件 {entry.name} 由密钥 {entry.key} 加密，该密钥已吊销，不能再用于解密。请联系密钥管理员评估。",
            ) from None
        except (KeyVersionUnknown, KeyNotActive) as error:
            raise _conflict("REPORT_KEY_UNAVAILABLE", f"报告文件 {entry.name} 的解密密钥不可用：{error.message}") from None
        except CiphertextTruncated:
            raise _conflict(
                "REPORT_FILE_TRUNCATED",
                f"报告运行 {run_id} 的加密文件 {encrypted.name} 不完整（被截断），未返回任何内容。请从备份恢复归档。",
            ) from None
        except (CiphertextTampered, CiphertextTrailingData):
            raise _conflict(
                "REPORT_FILE_TAMPERED",
                f"报告运行 {run_id} 的加密文件 {encrypted.name} 完整性校验失败（被篡改），未返回任何内容。请从备份恢复归档。",
            ) from None
        except (WrongKey, StreamFormatInvalid, DocumentOwnerMismatch, DocumentKeyIdInvalid) as error:
            raise _conflict(
                "REPORT_FILE_INVALID", f"报告运行 {run_id} 的加密文件 {encrypted.name} 无法解密：{error.message}"
            ) from None

        if document.key_label != entry.key:
            raise _conflict(
                "REPORT_FILE_INVALID",
                f"加密文件 {encrypted.name} 使用密钥 {document.key_label}，清单记录为 {entry.key}，文件可能被替换。",
            )
        size, digest = plaintext.stat().st_size, sm3_file(plaintext)
        if size != entry.size or digest != entry.sm3:
            raise _conflict(
                "REPORT_FILE_DIGEST_MISMATCH",
                f"报告文件 {entry.name} 解密后的大小或 SM3 杂凑值与签名清单不一致，文件可能被替换，未返回任何内容。",
            )
        handle = open(plaintext, "rb")
    finally:
        # The open handle keeps the data readable; nothing decrypted stays on disk.
        shutil.rmtree(workspace, ignore_errors=True)
    return handle


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    try:
        while chunk := handle.read(_CHUNK):
            yield chunk
    finally:
        handle.close()
