"""The raw warehouse: one Parquet partition per institution, encrypted at rest under its SM4 data key.

Layout: ``<data_dir>/warehouse/<table>/institution=<code>/part-0.parquet.rssg``, folders 0700 and
files 0600. Each partition is a Parquet file encrypted as a document of
:mod:`regsandbox_core.documents` (segmented SM4-GCM, stream key ID ``<code>/data/v<N>``) under the
institution's active data key. The associated data ``regsandbox-warehouse/1|<table>|<code>`` binds
the partition to its table and institution, so a partition moved to another folder fails to decrypt.
The Parquet bytes are built and parsed in memory and never written to disk in plaintext.

Migration: data directories from before this format hold plaintext ``part-0.parquet`` files.
:func:`read_partition`, which the extract builder calls on every build, first encrypts such a file,
reads the result back, compares it with the plaintext and only then deletes the plaintext
(:func:`migrate_plaintext_partition`). :func:`write_partition` (``load-demo``) replaces the partition
and deletes a plaintext file it supersedes. After a rotation of the institution's data key, the
next build re-encrypts the partition under the new version.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import polars as pl

from regsandbox_core.documents import decrypt_document, encrypt_document
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import fsync_directory
from regsandbox_core.keystore import KIND_DATA, KeyStore, KeyStoreError
from regsandbox_core.settings import Settings
from regsandbox_core.streaming import read_stream_header

logger = logging.getLogger(__name__)

APPLICATIONS_TABLE = "applications"
PARTITION_NAME = "part-0.parquet.rssg"
PLAINTEXT_PARTITION_NAME = "part-0.parquet"
"""File name of an unencrypted partition written before encryption at rest, which the next build migrates."""
ASSOCIATED_DATA_PREFIX = "regsandbox-warehouse/1"


class WarehousePartitionUnreadable(RegsandboxError):
    """Failed decryption of a partition, because of a wrong, revoked or destroyed key or an altered or truncated file.

    ``code`` and ``status`` are those of the underlying key store or stream error, which is the
    ``__cause__``. The message names the partition file before the underlying message.
    """

    def __init__(self, institution_code: str, path: Path, cause: RegsandboxError) -> None:
        super().__init__(
            cause.code,
            f"无法解密机构 {institution_code} 的数据仓库分区 {path}：{cause.message}",
            status=cause.status,
        )


class WarehousePartitionInvalid(RegsandboxError):
    """Partition that decrypts but does not contain a readable Parquet file."""

    status = 422

    def __init__(self, institution_code: str, path: Path, reason: str) -> None:
        super().__init__(
            "warehouse_partition_invalid",
            f"机构 {institution_code} 的数据仓库分区 {path} 不是有效的 Parquet 文件（{reason}）。"
            "请运行 `python -m extracts load-demo` 重新导入数据仓库。",
        )


class WarehouseMigrationMismatch(RegsandboxError):
    """Encrypted partition that does not decrypt to the plaintext partition it should replace."""

    status = 409

    def __init__(self, institution_code: str, encrypted: Path, plaintext: Path) -> None:
        super().__init__(
            "warehouse_migration_mismatch",
            f"机构 {institution_code} 的加密分区 {encrypted} 解密后与明文分区 {plaintext} 内容不一致，"
            "明文分区已保留，未删除。请确认哪一份是当前数据，删除另一份后重新生成数据提取。",
        )


def warehouse_table_dir(settings: Settings, table: str = APPLICATIONS_TABLE) -> Path:
    return settings.warehouse_dir / table


def warehouse_partition_dir(settings: Settings, institution_code: str, table: str = APPLICATIONS_TABLE) -> Path:
    """Return ``<data_dir>/warehouse/<table>/institution=<code>``."""
    return warehouse_table_dir(settings, table) / f"institution={institution_code}"


def warehouse_partition_file(settings: Settings, institution_code: str, table: str = APPLICATIONS_TABLE) -> Path:
    """Return the encrypted partition ``<data_dir>/warehouse/<table>/institution=<code>/part-0.parquet.rssg``."""
    return warehouse_partition_dir(settings, institution_code, table) / PARTITION_NAME


def plaintext_partition_file(settings: Settings, institution_code: str, table: str = APPLICATIONS_TABLE) -> Path:
    """Return the path of the unencrypted partition of an older data directory, ``.../part-0.parquet``."""
    return warehouse_partition_dir(settings, institution_code, table) / PLAINTEXT_PARTITION_NAME


def warehouse_institutions(settings: Settings, table: str = APPLICATIONS_TABLE) -> list[str]:
    """Return the institution codes that have an encrypted or a not yet migrated plaintext partition, sorted."""
    table_dir = warehouse_table_dir(settings, table)
    if not table_dir.is_dir():
        return []
    codes = []
    for entry in table_dir.iterdir():
        if not (entry.is_dir() and entry.name.startswith("institution=")):
            continue
        if (entry / PARTITION_NAME).is_file() or (entry / PLAINTEXT_PARTITION_NAME).is_file():
            codes.append(entry.name.removeprefix("institution="))
    return sorted(codes)


def partition_associated_data(institution_code: str, table: str = APPLICATIONS_TABLE) -> bytes:
    """Return the associated data that binds a partition to its table and institution."""
    return f"{ASSOCIATED_DATA_PREFIX}|{table}|{institution_code}".encode("utf-8")


def make_private_dirs(path: Path, top: Path) -> None:
    """Create ``path`` and its parents below ``top`` with mode 0700; ``top`` itself is left alone."""
    target = top
    for part in path.relative_to(top).parts:
        target = target / part
        target.mkdir(mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)


def _encrypt_partition_bytes(
    settings: Settings, store: KeyStore, institution_code: str, table: str, parquet: bytes
) -> Path:
    """Encrypt Parquet bytes into the partition file, which appears atomically with mode 0600."""
    path = warehouse_partition_file(settings, institution_code, table)
    make_private_dirs(path.parent, settings.data_dir)
    encrypt_document(
        store, institution_code, io.BytesIO(parquet), path, partition_associated_data(institution_code, table)
    )
    return path


def _delete_plaintext(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_partition(
    settings: Settings, store: KeyStore, institution_code: str, frame: pl.DataFrame, table: str = APPLICATIONS_TABLE
) -> Path:
    """Encrypt ``frame`` as the institution's partition under its active data key and return the file.

    The Parquet file is serialized into memory, so plaintext never reaches the disk. A plaintext
    partition of an older data directory is deleted once the new partition is in place, because the
    new data supersede it. Raises the key store's ``NoActiveKey`` when the institution has no active
    data key.
    """
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    path = _encrypt_partition_bytes(settings, store, institution_code, table, buffer.getvalue())
    plaintext = plaintext_partition_file(settings, institution_code, table)
    if plaintext.exists():
        _delete_plaintext(plaintext)
        logger.info("deleted plaintext warehouse partition %s, superseded by %s", plaintext, path)
    return path


def read_partition_bytes(
    settings: Settings, store: KeyStore, institution_code: str, table: str = APPLICATIONS_TABLE
) -> bytes:
    """Decrypt the institution's partition into memory and return the Parquet bytes.

    All-or-nothing: the bytes are returned only after every segment verified. Raises
    :class:`WarehousePartitionUnreadable` with the code of the key store error (``key_revoked``,
    ``key_destroyed``, ...) or stream error (``stream_wrong_key``, ``ciphertext_tampered``,
    ``ciphertext_truncated``, ...) as its cause, and ``FileNotFoundError`` when there is no partition.
    """
    path = warehouse_partition_file(settings, institution_code, table)
    # NOTE: the whole decrypted partition is held in memory (plus the frame parsed from it), so
    # memory use grows with the partition size. The ciphertext itself is read segment by segment.
    buffer = io.BytesIO()
    try:
        decrypt_document(store, institution_code, path, buffer, partition_associated_data(institution_code, table))
    except RegsandboxError as error:
        logger.warning(
            "failed to decrypt warehouse partition %s of %s: %s", path, institution_code, error.code
        )
        raise WarehousePartitionUnreadable(institution_code, path, error) from error
    return buffer.getvalue()


def migrate_plaintext_partition(
    settings: Settings, store: KeyStore, institution_code: str, table: str = APPLICATIONS_TABLE
) -> bool:
    """Encrypt a plaintext partition of an older data directory, verify it and delete the plaintext.

    Returns False when there is no plaintext partition. The plaintext is deleted only after the
    encrypted partition decrypts to exactly its bytes. An encrypted partition that already exists
    (left by an interrupted migration) is compared instead of overwritten, and
    :class:`WarehouseMigrationMismatch` is raised, keeping both files, when the two differ.
    """
    plaintext_path = plaintext_partition_file(settings, institution_code, table)
    try:
        plaintext = plaintext_path.read_bytes()
    except FileNotFoundError:
        return False

    encrypted_path = warehouse_partition_file(settings, institution_code, table)
    if not encrypted_path.exists():
        _encrypt_partition_bytes(settings, store, institution_code, table, plaintext)
    if read_partition_bytes(settings, store, institution_code, table) != plaintext:
        raise WarehouseMigrationMismatch(institution_code, encrypted_path, plaintext_path)

    _delete_plaintext(plaintext_path)
    logger.warning(
        "migrated plaintext warehouse partition %s to %s and deleted the plaintext", plaintext_path, encrypted_path
    )
    return True


def read_partition(
    settings: Settings, store: KeyStore, institution_code: str, table: str = APPLICATIONS_TABLE
) -> pl.DataFrame:
    """Return the institution's raw rows, migrating a plaintext partition first.

    Raises :class:`WarehousePartitionUnreadable` when decryption fails (see
    :func:`read_partition_bytes`) and :class:`WarehousePartitionInvalid` when the decrypted bytes
    are not Parquet.
    """
    migrate_plaintext_partition(settings, store, institution_code, table)
    parquet = read_partition_bytes(settings, store, institution_code, table)
    try:
        frame = pl.read_parquet(io.BytesIO(parquet))
    except pl.exceptions.PolarsError as error:
        path = warehouse_partition_file(settings, institution_code, table)
        raise WarehousePartitionInvalid(institution_code, path, type(error).__name__) from error
    _reencrypt_after_rotation(settings, store, institution_code, table, parquet)
    return frame


def partition_key_label(settings: Settings, institution_code: str, table: str = APPLICATIONS_TABLE) -> str:
    """Return the key label (``<code>/data/v<N>``) named in the partition's header, without decrypting."""
    with warehouse_partition_file(settings, institution_code, table).open("rb") as handle:
        return read_stream_header(handle).key_id


def _reencrypt_after_rotation(
    settings: Settings, store: KeyStore, institution_code: str, table: str, parquet: bytes
) -> None:
    """Re-encrypt a partition written under an older data key version with the active one.

    After a rotation the old version only decrypts, so every build moves the partition to the new
    version, and the security administrator can later revoke or destroy the old one without
    losing the warehouse. Without an active version the partition stays as it is.
    """
    try:
        active = store.current(institution_code, KIND_DATA).version
    except KeyStoreError as error:
        logger.warning("warehouse partition of %s not re-encrypted, no active data key: %s",
                       institution_code, error.code)
        return
    current_label = partition_key_label(settings, institution_code, table)
    if current_label == f"{institution_code}/{KIND_DATA}/v{active}":
        return
    path = _encrypt_partition_bytes(settings, store, institution_code, table, parquet)
    logger.info("re-encrypted warehouse partition %s from %s to %s/%s/v%s",
                path, current_label, institution_code, KIND_DATA, active)
