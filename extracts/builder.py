"""Masked extracts: one folder per institution that its sandbox users may read.

``build_extract`` decrypts the institution's raw warehouse partition in memory (see
:mod:`extracts.warehouse`). It replaces the direct identifiers
(name, resident ID number, mobile) by keyed HMAC-SM3 tokens under the institution's active token
key from the key store (``<code>/token/v<n>``). It then writes ``applications.parquet``,
``manifest.json`` and ``manifest.json.sig`` (the platform's detached SM2 signature of the
manifest) to ``<data_dir>/extracts/<code>/``. The same person gets the same token within one institution and
unrelated tokens at two institutions, because the institutions' keys differ. After a rotation of
the token key the next build yields new tokens, and the manifest names the new version.

Every file is written to a temporary file in the same folder, given its final owner and mode, and
moved into place with ``os.replace``. The manifest is written after the table and signed last, so
a reader that finds a manifest finds the files it lists.
"""

from __future__ import annotations

import datetime
import grp
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from extracts.demo_data import IDENTIFIER_COLUMNS, write_parquet_atomic
from extracts.warehouse import APPLICATIONS_TABLE, read_partition, warehouse_institutions
from regsandbox_core.crypto import keyed_token, sm3_file
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_output
from regsandbox_core.keystore import KIND_SIGNING, KIND_TOKEN, PLATFORM_OWNER, KeyStore, KeyVersion, NoActiveKey
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.signing import sign_file

logger = logging.getLogger(__name__)

INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")
MANIFEST_NAME = "manifest.json"
MANIFEST_SIGNATURE_KIND = "extract_manifest"

# Extract column -> warehouse column it is computed from. The source columns never reach the extract.
TOKEN_COLUMNS: dict[str, str] = {
    "person_token": "id_number",
    "name_token": "name",
    "mobile_token": "mobile",
}


class InvalidInstitutionError(RegsandboxError):
    """The institution code is malformed or has no rows in the warehouse."""


class ExtractKeyMissingError(RegsandboxError):
    """The key store has no active token key of the institution or no active platform signing key."""

    status = 409


class WarehouseMissingError(RegsandboxError):
    """The warehouse contains no data yet, so no extract can be built."""

    status = 409


@dataclass(frozen=True)
class ExtractPermissions:
    """Owner and modes given to an extract folder and its files."""

    uid: int | None
    gid: int | None
    dir_mode: int
    file_mode: int
    group_name: str | None

    def apply(self, path: Path, *, is_dir: bool) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)
        os.chmod(path, self.dir_mode if is_dir else self.file_mode)


def extract_dir(settings: Settings, institution_code: str) -> Path:
    """Return ``<data_dir>/extracts/<code>``."""
    return settings.extracts_dir / institution_code


def resolve_permissions(unix_group: str | None) -> ExtractPermissions:
    """Choose owner and modes: group-readable for ``unix_group`` when running as root, else owner only.

    Group access (folder 0750, files 0640, owner root, group ``unix_group``) needs root and an
    existing group. Otherwise the extract is private to the current user (0700 and 0600), which
    suits a single-user installation where the operator is also the modeller.
    """
    if unix_group and os.geteuid() == 0:
        try:
            gid = grp.getgrnam(unix_group).gr_gid
        except KeyError:
            logger.warning("Unix group %s does not exist; the extract stays private to root", unix_group)
        else:
            return ExtractPermissions(uid=0, gid=gid, dir_mode=0o750, file_mode=0o640, group_name=unix_group)
    elif unix_group:
        logger.warning("not running as root, so the extract cannot be shared with Unix group %s", unix_group)

    if os.geteuid() == 0:
        return ExtractPermissions(uid=0, gid=0, dir_mode=0o700, file_mode=0o600, group_name=None)
    return ExtractPermissions(uid=None, gid=None, dir_mode=0o700, file_mode=0o600, group_name=None)


def validate_institution(settings: Settings, institution_code: str) -> None:
    """Raise InvalidInstitutionError unless the code is well-formed and the warehouse has its rows."""
    if not INSTITUTION_CODE.match(institution_code):
        raise InvalidInstitutionError(
            "INVALID_INSTITUTION_CODE",
            f"机构代码 {institution_code!r} 格式不正确：应以小写字母开头，只含小写字母、数字和下划线，长度 2–32，例如 bank_a。",
        )
    known = warehouse_institutions(settings)
    if not known:
        raise WarehouseMissingError(
            "WAREHOUSE_EMPTY",
            f"数据仓库 {settings.warehouse_dir} 中没有申请数据。请先运行 `python -m extracts load-demo` 导入演示数据。",
        )
    if institution_code not in known:
        raise InvalidInstitutionError(
            "INSTITUTION_NOT_IN_WAREHOUSE",
            f"数据仓库中没有机构 {institution_code} 的数据。可用的机构代码：{'、'.join(known)}。",
        )


def mask_applications(raw: pl.DataFrame, key: bytes) -> pl.DataFrame:
    """Replace name, ID number and mobile by HMAC-SM3 tokens; token columns come right after application_id."""
    tokens = {
        token_column: [keyed_token(key, value) for value in raw[source_column].to_list()]
        for token_column, source_column in TOKEN_COLUMNS.items()
    }
    features = raw.drop(*IDENTIFIER_COLUMNS, "application_id")
    return pl.concat(
        [raw.select("application_id"), pl.DataFrame(tokens), features],
        how="horizontal",
    )


def describe_parquet(path: Path) -> tuple[list[dict[str, str]], int]:
    """Return the columns (name and DuckDB type) and the row count of a Parquet file."""
    con = duckdb.connect()
    try:
        relation = con.read_parquet(str(path))
        columns = [{"name": name, "type": str(dtype)} for name, dtype in zip(relation.columns, relation.types)]
        (row_count,) = con.sql("SELECT count(*) FROM read_parquet($path)", params={"path": str(path)}).fetchall()[0]
    finally:
        con.close()
    return columns, int(row_count)


def _write_json_atomic(document: dict, path: Path, permissions: ExtractPermissions) -> None:
    text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    with atomic_output(path, before_replace=lambda temporary: permissions.apply(temporary, is_dir=False)) as stream:
        stream.write(text.encode("utf-8"))


def _prepare_dirs(settings: Settings, target: Path, permissions: ExtractPermissions) -> None:
    """Create ``extracts/`` and the institution folder with the modes sandbox users need."""
    extracts_root = settings.extracts_dir
    if permissions.group_name:
        # Sandbox users must pass through extracts/ without listing it (they must not learn
        # which other institutions exist), hence 0711.
        extracts_root.mkdir(parents=True, exist_ok=True)
        os.chmod(extracts_root, 0o711)
        _warn_untraversable_parents(extracts_root)
    elif not extracts_root.exists():
        extracts_root.mkdir(parents=True, mode=0o700)
        os.chmod(extracts_root, 0o700)

    target.mkdir(mode=0o700, exist_ok=True)
    permissions.apply(target, is_dir=True)


def _warn_untraversable_parents(path: Path) -> None:
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            logger.warning(
                "folder %s is not traversable by other users, so sandbox users cannot reach their extract; "
                "give it mode 0711 or 0755",
                parent,
            )


def _active_key(keystore: KeyStore, owner: str, kind: str) -> KeyVersion:
    """Return the active version, or raise ExtractKeyMissingError telling the operator what to run."""
    try:
        return keystore.current(owner, kind)
    except NoActiveKey:
        purpose = "平台签名密钥" if kind == KIND_SIGNING else f"机构 {owner} 的令牌化密钥"
        raise ExtractKeyMissingError(
            "EXTRACT_KEY_MISSING",
            f"密钥库中没有启用状态的{purpose}（{owner}/{kind}），无法生成数据提取。"
            "请运行 `regsandbox init` 补齐密钥；若该密钥已被吊销，请由密钥管理员生成并启用新版本。",
        ) from None


def build_extract(
    settings: Settings, institution_code: str, unix_group: str | None = None, *, keystore: KeyStore | None = None
) -> Path:
    """Build the masked extract of one institution and return its folder.

    Writes ``applications.parquet``, ``manifest.json`` and ``manifest.json.sig`` into
    ``<data_dir>/extracts/<code>``. Tokens use the active ``<code>/token`` key of ``keystore``
    (default: the data directory's key store); the manifest records its version and label.
    With ``unix_group`` and root privileges the folder becomes 0750 root:<group> and its files
    0640; otherwise 0700 and 0600. Rebuilding with the same key writes byte-identical Parquet.

    Raises InvalidInstitutionError for a malformed or unknown code, WarehouseMissingError when
    the warehouse is empty, KeyStoreMissing when ``regsandbox init`` has not created the key
    store, ExtractKeyMissingError when the token or signing key has no active version, and
    WarehousePartitionUnreadable when the partition cannot be decrypted (wrong, revoked or
    destroyed data key, altered or truncated file). All of these are raised before anything
    is written, so the previous extract stays as it was. A plaintext partition of an older
    data directory is encrypted and deleted first (:func:`extracts.warehouse.read_partition`).
    """
    validate_institution(settings, institution_code)
    if keystore is None:
        keystore = open_keystore(settings)
    token_key = _active_key(keystore, institution_code, KIND_TOKEN)
    _active_key(keystore, PLATFORM_OWNER, KIND_SIGNING)
    raw = read_partition(settings, keystore, institution_code)
    masked = mask_applications(raw, token_key.key)

    target = extract_dir(settings, institution_code)
    permissions = resolve_permissions(unix_group)
    _prepare_dirs(settings, target, permissions)

    table_file = target / f"{APPLICATIONS_TABLE}.parquet"
    write_parquet_atomic(
        masked, table_file, before_replace=lambda temporary: permissions.apply(temporary, is_dir=False)
    )
    columns, row_count = describe_parquet(table_file)

    manifest = {
        "institution": institution_code,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tables": [
            {
                "name": APPLICATIONS_TABLE,
                "file": table_file.name,
                "columns": columns,
                "row_count": row_count,
                "sm3": sm3_file(table_file),
            }
        ],
        "token_key_version": token_key.version,
        "token_key": token_key.label,
        "tokenised_columns": [
            {"column": column, "source": source, "method": "HMAC-SM3"} for column, source in TOKEN_COLUMNS.items()
        ],
        "target": {"column": "creditability", "positive_class": 1, "meaning": "1 = 违约（bad），0 = 正常（good）"},
    }
    manifest_path = target / MANIFEST_NAME
    _write_json_atomic(manifest, manifest_path, permissions)
    # sign_file writes the signature atomically with the manifest's mode; the group comes after.
    permissions.apply(sign_file(keystore, manifest_path, kind=MANIFEST_SIGNATURE_KIND), is_dir=False)
    logger.info(
        "built extract of %s: %d rows, token key %s, group %s, folder %s",
        institution_code, row_count, token_key.label, permissions.group_name, target,
    )
    return target


def build_all(
    settings: Settings, unix_group_prefix: str | None = None, *, keystore: KeyStore | None = None
) -> dict[str, Path]:
    """Build the extract of every institution in the warehouse; the group is ``<prefix><code>``."""
    codes = warehouse_institutions(settings)
    if not codes:
        raise WarehouseMissingError(
            "WAREHOUSE_EMPTY",
            f"数据仓库 {settings.warehouse_dir} 中没有申请数据。请先运行 `python -m extracts load-demo` 导入演示数据。",
        )
    if keystore is None:
        keystore = open_keystore(settings)
    return {
        code: build_extract(
            settings, code, f"{unix_group_prefix}{code}" if unix_group_prefix is not None else None, keystore=keystore
        )
        for code in codes
    }
