"""Versioned extract folders and their atomic publication.

Layout under ``<data_dir>/extracts``::

    <code>                  symlink to <code>.builds/<build id>, the published extract
    <code>.builds/          one folder per build (0711 as root, else 0700)
    <code>.builds/<id>/     the tables, manifest.json and manifest.json.sig (0750 root:<group> or 0700)
    platform_signing_keys.json   public keys that the kernel helper trusts (0644)

A build is written into a new ``<code>.builds/<id>`` folder. Publishing creates a symlink under a
temporary name and renames it over ``<code>``. Because ``rename`` replaces the old link in one
step, a reader that resolves ``<code>`` finds the old build or the new one, never a mix. The previous build
is kept, so a kernel that resolved the link before the switch can finish reading it, and older
builds are deleted. A ``<code>`` that is still a plain folder (the layout before versioned builds)
is swapped with the new link by ``renameat2(RENAME_EXCHANGE)`` and then moved into
``<code>.builds``.

Institution codes contain no dot (``^[a-z][a-z0-9_]{1,31}$``), so ``<code>.builds`` never clashes
with another institution's link.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import grp
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from regsandbox_core.files import atomic_output, fsync_directory
from regsandbox_core.keystore import KIND_SIGNING, PLATFORM_OWNER, STATE_ACTIVE, STATE_DECRYPT_ONLY, STATE_DESTROYED, KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

BUILDS_SUFFIX = ".builds"
TRUSTED_KEYS_NAME = "platform_signing_keys.json"
TRUSTED_KEYS_FORMAT = "regsandbox-trusted-keys/1"
KEEP_PREVIOUS_BUILDS = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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


def extract_dir(settings: Settings, institution_code: str) -> Path:
    """Return ``<data_dir>/extracts/<code>``, the published extract (a symlink to the current build)."""
    return settings.extracts_dir / institution_code


def builds_dir(settings: Settings, institution_code: str) -> Path:
    return settings.extracts_dir / f"{institution_code}{BUILDS_SUFFIX}"


def new_build_id() -> str:
    """Return a sortable, unique build id such as ``20261205T073000Z-3f9a1c``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def prepare_root(settings: Settings, permissions: ExtractPermissions) -> None:
    """Create ``extracts/``: 0711 as root (sandbox users pass through without listing it), else 0700."""
    root = settings.extracts_dir
    if not root.exists():
        root.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o711 if os.geteuid() == 0 else 0o700)
    if permissions.group_name:
        _warn_untraversable_parents(root)


def _warn_untraversable_parents(path: Path) -> None:
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            logger.warning(
                "folder %s is not traversable by other users, so sandbox users cannot reach their extract; "
                "give it mode 0711 or 0755",
                parent,
            )


@contextlib.contextmanager
def build_lock(settings: Settings, institution_code: str) -> Iterator[None]:
    """Hold an exclusive lock on ``extracts/.<code>.lock``, so two builds of one institution do not interleave."""
    descriptor = os.open(settings.extracts_dir / f".{institution_code}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def create_build_dir(settings: Settings, institution_code: str, build_id: str) -> Path:
    """Create ``<code>.builds/<build id>`` (0700 until it is published)."""
    parent = builds_dir(settings, institution_code)
    parent.mkdir(mode=0o700, exist_ok=True)
    # Traversable but not listable as root, so group members reach the build the link names.
    os.chmod(parent, 0o711 if os.geteuid() == 0 else 0o700)
    folder = parent / build_id
    folder.mkdir(mode=0o700)
    return folder


def current_build(settings: Settings, institution_code: str) -> Path | None:
    """Return the real folder of the published extract, or None when nothing is published."""
    link = extract_dir(settings, institution_code)
    if not link.exists():
        return None
    return Path(os.path.realpath(link))


def _rename_exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False when unsupported."""
    library = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    function = getattr(library, "renameat2", None)
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def publish(settings: Settings, institution_code: str, build: Path) -> None:
    """Point ``extracts/<code>`` at ``build`` in one rename, then delete builds older than the previous one."""
    link = extract_dir(settings, institution_code)
    temporary = link.with_name(f".{institution_code}.link.{secrets.token_hex(4)}")
    os.symlink(f"{build.parent.name}/{build.name}", temporary)
    try:
        if link.is_dir() and not link.is_symlink():
            _replace_plain_folder(settings, institution_code, link, temporary)
        else:
            os.replace(temporary, link)
    except BaseException:
        if temporary.is_symlink():
            temporary.unlink()
        raise
    fsync_directory(link.parent)
    logger.info("published extract %s -> %s", link, build)
    _delete_old_builds(settings, institution_code, build)


def _replace_plain_folder(settings: Settings, institution_code: str, link: Path, temporary: Path) -> None:
    """Replace an extract folder of the layout before versioned builds by the link, atomically where possible."""
    legacy = builds_dir(settings, institution_code) / f"legacy-{new_build_id()}"
    if _rename_exchange(temporary, link):
        os.rename(temporary, legacy)  # ``temporary`` now names the old folder
        return
    # NOTE: without renameat2 the path is missing between these two renames.
    logger.warning("renameat2 is not available; %s is briefly absent while it becomes a link", link)
    os.rename(link, legacy)
    os.replace(temporary, link)


def _delete_old_builds(settings: Settings, institution_code: str, current: Path) -> None:
    parent = builds_dir(settings, institution_code)
    others = sorted((path for path in parent.iterdir()
                     if path.is_dir() and path != current and not path.name.startswith(".")),
                    key=lambda path: path.stat().st_mtime)
    for folder in others[: max(0, len(others) - KEEP_PREVIOUS_BUILDS)]:
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("deleted old extract build %s", folder)


def discard_build(build: Path) -> None:
    """Delete an unpublished build folder after a failure."""
    shutil.rmtree(build, ignore_errors=True)


def write_trusted_keys(settings: Settings, keystore: KeyStore) -> Path:
    """Write the platform's usable signing public keys to ``extracts/platform_signing_keys.json`` (0644).

    The kernel helper verifies manifests against this file, since sandbox users cannot read the
    key store. Revoked and pending versions are left out. Only the builder (root, or the single
    operator account) can write the file, because ``extracts/`` is not writable by others.
    """
    keys = {}
    for entry in keystore.metadata()["keys"]:
        if (entry["owner"], entry["kind"]) != (PLATFORM_OWNER, KIND_SIGNING):
            continue
        if entry["state"] in (STATE_ACTIVE, STATE_DECRYPT_ONLY, STATE_DESTROYED) and entry.get("public_key"):
            keys[f"{PLATFORM_OWNER}/{KIND_SIGNING}/v{entry['version']}"] = entry["public_key"]
    document = {"format": TRUSTED_KEYS_FORMAT, "keys": dict(sorted(keys.items()))}
    path = settings.extracts_dir / TRUSTED_KEYS_NAME
    text = json.dumps(document, ensure_ascii=False, indent=1) + "\n"
    with atomic_output(path, before_replace=lambda temporary: os.chmod(temporary, 0o644)) as stream:
        stream.write(text.encode("utf-8"))
    return path
