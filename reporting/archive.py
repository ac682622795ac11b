"""Staging and archiving of report runs under ``<data_dir>/reports``.

A run writes into ``reports/.staging/<run id>-<random>/``. When it ends, the whole folder is renamed
in one step to ``reports/<schedule id>/<run id>/`` (delivered) or ``reports/failed/<run id>/``, so
readers never see a half-written archive. Folders are 0700 and files 0600.
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
from regsandbox_core.secrets import write_private_file
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

FAILED_FOLDER = "failed"
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


def write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` with the SM3 digest of every other file in the staging folder."""
    files = sorted(path for path in staging.iterdir() if path.is_file() and path.name != "manifest.json")
    for path in files:
        os.chmod(path, 0o600)
    manifest = {**manifest, "files": {path.name: {"sm3": sm3_file(path), "size": path.stat().st_size} for path in files}}
    write_private_file(staging / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2).encode("utf-8"))


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
