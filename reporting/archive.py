"""Staging and archiving of report runs under ``<data_dir>/reports``.

A run writes into ``reports/.staging/<run id>-<random>/``. When it ends, the whole folder is renamed
in one step to ``reports/<schedule id>/<run id>/`` (delivered) or ``reports/failed/<run id>/``, so
readers never see a half-written archive. Folders are 0700 and files 0600.

Before the move, :func:`write_manifest` encrypts every file of the run under the active
``platform/data`` key (scheduled reports are the regulator's documents): ``report.html`` becomes
``report.html.rssg`` in the segmented SM4-GCM format of :mod:`regsandbox_core.streaming`, and the
plaintext is deleted. ``manifest.json`` then lists each file's plaintext name, size and SM3, the
ciphertext's name, size and SM3 and the key label, and is signed with the platform's SM2 key into
``manifest.json.sig`` (kind ``report_manifest``). admin_api's download endpoint checks all of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from regsandbox_core.crypto import sm3_file
from regsandbox_core.documents import encrypt_document
from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.files import write_private_file
from regsandbox_core.keystore import KIND_DATA, KIND_SIGNING, PLATFORM_OWNER, KeyStore
from regsandbox_core.platform_keys import log_key_event, open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import sign_file

logger = logging.getLogger(__name__)

FAILED_FOLDER = "failed"
MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "report_manifest"
ENCRYPTED_SUFFIX = ".rssg"
ENCRYPTION = "SM4-GCM-segmented/1"
_STAGING_FOLDER = ".staging"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def safe_id(value: object, label: str) -> str:
    """Return ``value`` as a folder name, or raise ValueError when it could escape the reports folder."""
    text = str(value)
    if not _SAFE_ID.match(text) or text in {FAILED_FOLDER, _STAGING_FOLDER}:
        raise ValueError(f"{label} {text!r} is not usable as a folder name")
    return text


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def create_staging(settings: Settings, run_id: str) -> Path:
    """Create and return an empty private staging folder for one run."""
    _private_dir(settings.reports_dir)
    staging_root = _private_dir(settings.reports_dir / _STAGING_FOLDER)
    return Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=staging_root))


class ArchiveSealFailed(RegsandboxError):
    """The run's files could not be encrypted or its manifest signed; nothing of the run is kept."""

    status = 500

    def __init__(self, cause: RegsandboxError) -> None:
        super().__init__(
            "ARCHIVE_ENCRYPTION_FAILED",
            f"报表归档加密或清单签名失败：{cause.message}（{cause.code}）。"
            "为避免明文留存，本次运行的输出已删除。请由密钥管理员检查 platform/data 与 platform/signing 密钥后重新运行。",
        )


def check_archive_keys(settings: Settings) -> None:
    """Raise ConfigurationError unless the key store can encrypt (platform/data) and sign (platform/signing) archives."""
    try:
        store = open_keystore(settings, on_event=log_key_event)
        store.current(PLATFORM_OWNER, KIND_DATA)
        store.current(PLATFORM_OWNER, KIND_SIGNING)
    except RegsandboxError as error:
        raise ConfigurationError(error.code, f"报表归档需要平台数据密钥和签名密钥：{error.message}") from error


def file_associated_data(name: str) -> bytes:
    """Return the associated data of an archived file, which binds its ciphertext to its plaintext name."""
    return f"regsandbox-report-file/1|{name}".encode("utf-8")


def write_manifest(settings: Settings, staging: Path, manifest: dict[str, Any]) -> None:
    """Encrypt every file in the staging folder, then write and sign ``manifest.json``.

    Each plaintext file is replaced by ``<name>.rssg``. Raises :class:`ArchiveSealFailed` when the
    key store cannot encrypt or sign; the caller then deletes the staging folder.
    """
    files = sorted(path for path in staging.iterdir() if path.is_file() and path.name != MANIFEST_NAME)
    try:
        store = open_keystore(settings, on_event=log_key_event)
        entries = {path.name: _encrypt_file(store, path) for path in files}
        manifest = {**manifest, "encryption": ENCRYPTION, "files": entries}
        manifest_path = staging / MANIFEST_NAME
        write_private_file(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2).encode("utf-8"))
        sign_file(store, manifest_path, MANIFEST_KIND)
    except RegsandboxError as error:
        logger.error("sealing report archive %s failed: %s", staging.name, error.code)
        raise ArchiveSealFailed(error) from error


def _encrypt_file(store: KeyStore, path: Path) -> dict[str, Any]:
    """Encrypt one staged file to ``<name>.rssg``, delete the plaintext and return its manifest entry."""
    plain_size, plain_sm3 = path.stat().st_size, sm3_file(path)
    encrypted = path.with_name(path.name + ENCRYPTED_SUFFIX)
    document = encrypt_document(store, PLATFORM_OWNER, path, encrypted, file_associated_data(path.name))
    path.unlink()
    return {
        "size": plain_size,
        "sm3": plain_sm3,
        "ciphertext": encrypted.name,
        "ciphertext_size": encrypted.stat().st_size,
        "ciphertext_sm3": sm3_file(encrypted),
        "key": document.key_label,
    }


def _move(staging: Path, target: Path) -> Path:
    _private_dir(target.parent)
    if target.exists():
        # A run id is archived once; a second folder for it means a retried finish, so keep both.
        duplicate = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
        duplicate.rmdir()
        logger.warning("archive %s already exists, storing this run as %s", target, duplicate.name)
        target = duplicate
    os.rename(staging, target)
    return target


def archive_delivered(settings: Settings, staging: Path, schedule_id: str, run_id: str) -> Path:
    """Move a delivered run to ``reports/<schedule id>/<run id>/`` and return that folder."""
    return _move(staging, settings.reports_dir / schedule_id / run_id)


def archive_failed(settings: Settings, staging: Path, run_id: str) -> Path:
    """Move a failed run to ``reports/failed/<run id>/`` and return that folder."""
    return _move(staging, settings.reports_dir / FAILED_FOLDER / run_id)
