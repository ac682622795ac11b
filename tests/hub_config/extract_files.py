"""Small signed extracts for the hub tests: one file per institution, a manifest signed like the builder's."""

from __future__ import annotations

import json
import os

from extracts.publish import write_trusted_keys
from regsandbox_core.crypto import sm3_file
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import sign_file
from regsandbox_kernel.extract import MANIFEST_SIGNATURE_KIND


def write_extract(settings: Settings, code: str) -> None:
    """Write ``extracts/<code>`` with ``applications.parquet`` (text ``extract of <code>``) and a signed manifest.

    The folder is left root-only (0700), as an extract builder leaves it before the spawner fixes
    the group. The platform signing key must exist (``ensure_platform_keys``).
    """
    folder = settings.extracts_dir / code
    folder.mkdir(parents=True)
    table = folder / "applications.parquet"
    table.write_bytes(f"extract of {code}".encode())
    manifest = {"institution": code, "build_id": f"test-{code}",
                "tables": [{"name": "applications", "file": table.name, "sm3": sm3_file(table)}]}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    keystore = open_keystore(settings)
    sign_file(keystore, path, kind=MANIFEST_SIGNATURE_KIND)
    write_trusted_keys(settings, keystore)
    os.chmod(folder, 0o700)
