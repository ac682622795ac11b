"""Reading the signed manifests of the published extracts, for the extract pages and the catalog's lineage.

:func:`published_manifest` resolves ``<data_dir>/extracts/<code>`` to its current build and
returns the manifest only after its detached SM2 signature verifies against the key store.
A verified manifest is cached by its build folder, its size and modification time, and the
modification time of the key store. A build folder is never rewritten, because a new build gets
a new folder, and revoking a signing key changes the key store file. The cache saves the SM2
verification (about 18 ms each) when a page lists many institutions.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extracts.builder import MANIFEST_NAME, MANIFEST_SIGNATURE_KIND
from extracts.publish import current_build
from regsandbox_core.crypto import sm3_file
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import SignatureInvalid, SignedObjectInvalid, verify_file

logger = logging.getLogger(__name__)

CACHE_SIZE = 2048
"""Verified manifests kept in memory; one per institution is enough, so this covers 2,048 institutions."""


@dataclass(frozen=True)
class PublishedManifest:
    """The manifest of an institution's published build: ``document`` is None when it did not verify."""

    institution: str
    folder: Path
    document: dict[str, Any] | None
    manifest_sm3: str | None
    signature_key: str | None
    error: str | None = None
    """Chinese reason why the manifest is not usable, e.g. a signature that does not verify."""


_cache: dict[tuple[str, int, int, int], PublishedManifest] = {}
_cache_lock = threading.Lock()


def published_manifest(settings: Settings, keystore: KeyStore, institution_code: str) -> PublishedManifest | None:
    """Return the verified manifest of the published extract of ``institution_code``, or None when none is published."""
    folder = current_build(settings, institution_code)
    if folder is None:
        return None
    path = folder / MANIFEST_NAME
    try:
        status = path.stat()
        store_changed = Path(keystore.path).stat().st_mtime_ns
    except OSError as error:
        return PublishedManifest(institution_code, folder, None, None, None,
                                 f"无法读取数据提取清单 {path.name}（{error.strerror}）。")
    key = (str(folder), status.st_size, status.st_mtime_ns, store_changed)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached

    try:
        verified = verify_file(path, keystore)
        document = json.loads(path.read_text("utf-8"))
        digest = sm3_file(path)
    except (SignatureInvalid, SignedObjectInvalid) as error:
        logger.warning("manifest of the published extract %s does not verify: %s", folder, error.code)
        return PublishedManifest(institution_code, folder, None, None, None,
                                 f"数据提取清单的 SM2 签名验证失败（{error.code}），请重新生成该机构的数据提取。")
    except (OSError, ValueError) as error:
        logger.warning("manifest of the published extract %s is unreadable: %s", folder, type(error).__name__)
        return PublishedManifest(institution_code, folder, None, None, None,
                                 "数据提取清单无法读取或不是合法的 JSON，请重新生成该机构的数据提取。")
    if digest != verified.sm3:  # the file changed between verification and reading
        return PublishedManifest(institution_code, folder, None, None, None,
                                 "数据提取清单在验证签名后被修改，请重新生成该机构的数据提取。")
    if verified.kind != MANIFEST_SIGNATURE_KIND:
        return PublishedManifest(institution_code, folder, None, None, None,
                                 f"数据提取清单的签名类型为 {verified.kind}，不是数据提取清单签名，请重新生成该机构的数据提取。")

    result = PublishedManifest(institution_code, folder, document, digest, verified.key)
    with _cache_lock:
        if len(_cache) >= CACHE_SIZE:
            _cache.clear()
        _cache[key] = result
    return result


def manifest_summary(manifest: PublishedManifest) -> dict[str, Any]:
    """Return what the extract pages show of a published build: ids, policy, key versions, tables and row counts."""
    if manifest.document is None:
        return {"status": "invalid", "status_name": "清单无效", "error": manifest.error}
    document = manifest.document
    tables = [{"name": table.get("name"), "source_table": table.get("source", {}).get("table"),
               "rows": table.get("row_count"), "columns": len(table.get("columns", [])),
               "dropped_columns": len(table.get("dropped_columns", [])), "sm3": table.get("sm3")}
              for table in document.get("tables", [])]
    policy = document.get("policy") or {}
    return {
        "status": "published", "status_name": "已发布", "error": None,
        "build_id": document.get("build_id"), "built_at": document.get("built_at"),
        "policy": {"name": policy.get("name"), "version": policy.get("version"), "sm3": policy.get("sm3")},
        "token_key": document.get("token_key"), "token_key_version": document.get("token_key_version"),
        "manifest_sm3": manifest.manifest_sm3, "signature_key": manifest.signature_key, "tables": tables,
        "k_anonymity": _k_summary(document.get("k_anonymity")),
    }


def _k_summary(section: Any) -> dict[str, Any] | None:
    """Return k, whether every table met it and the override of a manifest's ``k_anonymity`` section."""
    if not isinstance(section, dict):
        return None
    return {"k": section.get("k"), "passed": section.get("passed"), "override": section.get("override")}
