"""Documents encrypted at rest under their owner's SM4 data key, in the segmented format of :mod:`.streaming`.

An owner is an institution code or ``platform``. :func:`encrypt_document` uses the owner's active
data key version and writes the stream key ID ``<owner>/data/v<N>``. :func:`decrypt_document`
reads that key ID, checks that it names the expected owner and fetches exactly that version from
the key store. A document written before a rotation still decrypts while its version is
decrypt_only. A revoked or destroyed version raises the key store's :class:`KeyRevoked` or
:class:`KeyDestroyed`.

Decryption to a path is all-or-nothing: the output appears only after every segment verified.
Decryption to a stream writes verified segments as it goes, so a caller that passes a stream
must discard it when an error is raised.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_output
from regsandbox_core.keystore import KIND_DATA, KeyStore
from regsandbox_core.streaming import (
    StreamHeader,
    decrypt_stream,
    encrypt_stream,
    read_stream_header,
)

__all__ = [
    "DocumentKeyIdInvalid",
    "DocumentOwnerMismatch",
    "EncryptedDocument",
    "decrypt_document",
    "document_key_label",
    "encrypt_document",
    "read_document_key",
]

Source = Union[Path, str, BinaryIO]
Destination = Union[Path, str, BinaryIO]

_KEY_ID = re.compile(r"^([a-z][a-z0-9_]{1,31})/data/v([1-9][0-9]{0,8})$")


class DocumentOwnerMismatch(RegsandboxError):
    """The document was encrypted under another owner's data key than the one expected."""

    status = 403

    def __init__(self, key_id: str, expected_owner: str) -> None:
        super().__init__(
            "document_owner_mismatch",
            f"文件由密钥 {key_id} 加密，不属于 {expected_owner}。请确认文件来源，只解密本所有者的文件。",
        )


class DocumentKeyIdInvalid(RegsandboxError):
    """The stream's key ID is not of the form ``<owner>/data/v<N>``."""

    status = 422

    def __init__(self, key_id: str) -> None:
        super().__init__(
            "document_key_id_invalid",
            f"文件头中的密钥标识 {key_id!r} 不是 <所有者>/data/v<版本号> 形式，该文件不是本平台加密的文档。",
        )


@dataclass(frozen=True)
class EncryptedDocument:
    """Key and header of a document that was encrypted or decrypted."""

    owner: str
    version: int
    header: StreamHeader

    @property
    def key_label(self) -> str:
        """The key ID of the stream, ``<owner>/data/v<N>``."""
        return document_key_label(self.owner, self.version)


def document_key_label(owner: str, version: int) -> str:
    """Return the stream key ID of an owner's data key version: ``<owner>/data/v<N>``."""
    return f"{owner}/{KIND_DATA}/v{version}"


def _parse_key_id(key_id: str) -> tuple[str, int]:
    match = _KEY_ID.match(key_id)
    if match is None:
        raise DocumentKeyIdInvalid(key_id)
    return match.group(1), int(match.group(2))


def encrypt_document(
    store: KeyStore, owner: str, src: Source, dst: Destination, associated_data: bytes = b""
) -> EncryptedDocument:
    """Encrypt ``src`` under the owner's active data key into ``dst`` and return the key used.

    A path destination appears only once complete (atomic rename, mode 0600). ``associated_data``
    is authenticated but not stored, so the reader must pass the same bytes.
    Raises the key store's :class:`~regsandbox_core.keystore.NoActiveKey` when the owner has no active data key.
    """
    key = store.current(owner, KIND_DATA)
    key_id = document_key_label(key.owner, key.version)
    with _open_source(src) as source, _open_destination(dst) as destination:
        header = encrypt_stream(key.key, key_id, source, destination, associated_data)
    return EncryptedDocument(key.owner, key.version, header)


def read_document_key(src: Path | str) -> tuple[str, int]:
    """Return (owner, version) from an encrypted file's header without decrypting it."""
    with open(src, "rb") as handle:
        return _parse_key_id(read_stream_header(handle).key_id)


def decrypt_document(
    store: KeyStore, expected_owner: str, src: Source, dst: Destination, associated_data: bytes = b""
) -> EncryptedDocument:
    """Decrypt a document of ``expected_owner`` into ``dst`` with the key version its header names.

    Raises :class:`DocumentOwnerMismatch` before any key is fetched when the header names another
    owner, :class:`DocumentKeyIdInvalid` for a foreign key ID, the key store's errors for an unusable
    version (KeyRevoked, KeyDestroyed, KeyVersionUnknown, KeyNotActive), and the stream errors of
    :func:`~regsandbox_core.streaming.decrypt_stream` for altered or truncated data.
    """
    with _open_source(src) as source:
        header = read_stream_header(source)
        owner, version = _parse_key_id(header.key_id)
        if owner != expected_owner:
            raise DocumentOwnerMismatch(header.key_id, expected_owner)
        key = store.get(owner, KIND_DATA, version)
        with _open_destination(dst) as destination:
            decrypt_stream(key.key, _Prefixed(header.raw, source), destination, associated_data, key_id=header.key_id)
    return EncryptedDocument(owner, version, header)


class _Prefixed:
    """Binary reader that returns ``prefix`` first and then the rest of ``stream``.

    The header is read once to find the key, then handed back to :func:`decrypt_stream`,
    which works on non-seekable streams too.
    """

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self._prefix = memoryview(prefix)
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size < 0 or size >= len(self._prefix):
                head, self._prefix = bytes(self._prefix), memoryview(b"")
                rest = self._stream.read(-1 if size < 0 else size - len(head))
                return head + rest
            head, self._prefix = bytes(self._prefix[:size]), self._prefix[size:]
            return head
        return self._stream.read(size)


@contextlib.contextmanager
def _open_source(src: Source) -> Iterator[BinaryIO]:
    """Open a path for reading, or pass a stream through without closing it."""
    if isinstance(src, (str, Path)):
        with open(src, "rb") as handle:
            yield handle
    else:
        yield src


@contextlib.contextmanager
def _open_destination(dst: Destination) -> Iterator[BinaryIO]:
    """Write a path atomically (mode 0600), or pass a stream through without closing it."""
    if isinstance(dst, (str, Path)):
        with atomic_output(Path(dst)) as handle:
            yield handle
    else:
        yield dst
