"""Segmented SM4-GCM file encryption with constant memory, in the manner of Tink's streaming AEAD.

File layout (all integers big-endian)::

    header:
        magic            4 bytes   b"RSSG"
        version          1 byte    1
        segment_size     4 bytes   plaintext bytes per segment
        salt            16 bytes   random per file, HKDF salt
        nonce_prefix     7 bytes   random per file
        key_check       16 bytes   HKDF output that distinguishes a wrong key from tampering
        key_id_length    1 byte
        key_id           key_id_length bytes, UTF-8
    segments, one or more:
        last_flag        1 byte    1 on the final segment, else 0
        length           4 bytes   ciphertext length including the 16-byte tag
        ciphertext       SM4-GCM(segment_key, nonce, plaintext, aad) || tag

The segment key and key check come from HKDF-SM3 over the data key with the file's salt,
so every file has its own key and nonces never repeat across files. Segment i uses the
nonce ``nonce_prefix || i (32 bits) || last_flag`` and the associated data
``SM3(header || associated_data)``. These choices make each attack fail in one place:

- reordered segments and segments swapped between files fail their tag (index and key differ);
- a header edit changes the associated data, so the first segment fails its tag;
- a changed salt or a wrong data key fails the key check;
- a stream that ends before a segment flagged last raises :class:`CiphertextTruncated`;
- bytes after the last segment raise :class:`CiphertextTrailingData`.

:func:`decrypt_stream` writes a segment only after its tag verifies, but a stream cut short
is only detected at its end, after earlier segments were written. A caller that needs
all-or-nothing output writes to a temporary file and renames it after success, which is
what :func:`decrypt_file` does.

Segments are encrypted and decrypted on a small thread pool and written in order. The
number of segments in memory depends on the pool size, not on the file size.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_output
from regsandbox_core.sm import GCM_TAG_SIZE, SM4_KEY_SIZE, KeyInvalid, sm3_digest

__all__ = [
    "CiphertextTampered",
    "CiphertextTrailingData",
    "CiphertextTruncated",
    "DEFAULT_SEGMENT_SIZE",
    "DEFAULT_WORKERS",
    "StreamDecryptionError",
    "StreamFormatInvalid",
    "StreamHeader",
    "WrongKey",
    "decrypt_file",
    "decrypt_stream",
    "encrypt_file",
    "encrypt_stream",
    "read_stream_header",
]

MAGIC = b"RSSG"
VERSION = 1
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 256
MAX_SEGMENT_SIZE = 64 << 20
SALT_SIZE = 16
NONCE_PREFIX_SIZE = 7
KEY_CHECK_SIZE = 16
MAX_KEY_ID_BYTES = 255
MAX_SEGMENTS = 1 << 32
# Segments are encrypted on worker threads because cryptography releases the GIL while it
# runs the cipher over a large buffer. At most 2 * workers segments are in flight, each with
# its plaintext and ciphertext, so the cap of 4 workers keeps buffers near 18 MiB with 1 MiB segments.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))

_FIXED_HEADER = struct.Struct(f">4sBI{SALT_SIZE}s{NONCE_PREFIX_SIZE}s{KEY_CHECK_SIZE}sB")
_RECORD_HEADER = struct.Struct(">BI")
_HKDF_INFO = b"regsandbox sm4-gcm stream v1"


class StreamDecryptionError(RegsandboxError):
    """Base class of the errors :func:`decrypt_stream` raises. Output written before it is untrusted."""


class StreamFormatInvalid(StreamDecryptionError):
    """The data is no regsandbox encrypted stream, or uses an unknown version."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            "stream_format_invalid",
            f"加密文件格式无效：{reason}。请确认该文件由本平台的 SM4-GCM 分段加密生成。",
        )


class WrongKey(StreamDecryptionError):
    """The data key (or the expected key ID) does not match the one the file was encrypted with."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            "stream_wrong_key",
            f"密钥不匹配：{reason}。请按文件头中的密钥标识和版本取用正确的数据密钥。",
        )


class CiphertextTampered(StreamDecryptionError):
    """A segment failed authentication: altered, reordered or taken from another file."""

    def __init__(self, segment_index: int, reason: str = "认证标签校验失败") -> None:
        super().__init__(
            "ciphertext_tampered",
            f"第 {segment_index} 段密文完整性校验失败（{reason}）：文件被篡改、段顺序被调换、"
            "混入其他文件的段，或附加认证数据不一致。请从可信来源重新获取该文件。",
        )
        self.segment_index = segment_index


class CiphertextTruncated(StreamDecryptionError):
    """The stream ended before its last segment."""

    def __init__(self, segment_index: int) -> None:
        super().__init__(
            "ciphertext_truncated",
            f"密文不完整：在第 {segment_index} 段之前或之中提前结束，缺少末段。"
            "文件可能在传输或存储中被截断，请重新获取完整文件。",
        )
        self.segment_index = segment_index


class CiphertextTrailingData(StreamDecryptionError):
    """Bytes follow the segment flagged last."""

    def __init__(self) -> None:
        super().__init__(
            "ciphertext_trailing_data",
            "密文末段之后存在多余数据，文件可能被追加或拼接。请从可信来源重新获取该文件。",
        )


@dataclass(frozen=True)
class StreamHeader:
    """Parsed header of an encrypted stream, with its exact bytes in ``raw``."""

    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    key_check: bytes
    key_id: str
    raw: bytes


# --- keys and nonces -------------------------------------------------------------------------


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != SM4_KEY_SIZE:
        size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise KeyInvalid(
            "sm4_key_invalid", f"数据密钥必须是 {SM4_KEY_SIZE} 字节（SM4-128），实际为 {size}。"
        )
    return bytes(key)


def _derive_keys(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """Return (segment key, key check) derived with HKDF-SM3 from the data key and salt."""
    output = HKDF(
        algorithm=hashes.SM3(),
        length=SM4_KEY_SIZE + KEY_CHECK_SIZE,
        salt=salt,
        info=_HKDF_INFO,
    ).derive(key)
    return output[:SM4_KEY_SIZE], output[SM4_KEY_SIZE:]


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _segment_aad(header: bytes, associated_data: bytes) -> bytes:
    # The header encodes its own length, so header || associated_data is unambiguous.
    return sm3_digest(header + associated_data)


# --- header ------------------------------------------------------------------------------------


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise RegsandboxError(
            "stream_segment_size_invalid",
            f"分段大小 {segment_size} 字节无效，应在 {MIN_SEGMENT_SIZE} 到 {MAX_SEGMENT_SIZE} 字节之间。",
        )


def _encode_key_id(key_id: str) -> bytes:
    encoded = key_id.encode("utf-8") if isinstance(key_id, str) else b""
    if not encoded or len(encoded) > MAX_KEY_ID_BYTES:
        raise RegsandboxError(
            "stream_key_id_invalid",
            f"密钥标识 {key_id!r} 无效：必须是 1 到 {MAX_KEY_ID_BYTES} 字节的 UTF-8 字符串，"
            "建议包含密钥版本，例如 \"inst-001/v3\"。",
        )
    return encoded


def _build_header(key: bytes, key_id: str, segment_size: int) -> tuple[StreamHeader, bytes]:
    """Return the header of a new file and its segment key."""
    salt = secrets.token_bytes(SALT_SIZE)
    nonce_prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
    segment_key, key_check = _derive_keys(key, salt)
    key_id_bytes = _encode_key_id(key_id)
    raw = (
        _FIXED_HEADER.pack(
            MAGIC, VERSION, segment_size, salt, nonce_prefix, key_check, len(key_id_bytes)
        )
        + key_id_bytes
    )
    header = StreamHeader(segment_size, salt, nonce_prefix, key_check, key_id, raw)
    return header, segment_key


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, or fewer only at the end of the stream, since pipes return short reads."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = src.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_stream_header(src: BinaryIO) -> StreamHeader:
    """Read and check the header of an encrypted stream, leaving ``src`` at the first segment.

    Callers use ``key_id`` to find the data key before calling :func:`decrypt_stream`.
    """
    fixed = _read_exact(src, _FIXED_HEADER.size)
    if len(fixed) < _FIXED_HEADER.size:
        raise StreamFormatInvalid(f"文件头不完整（{len(fixed)} 字节）")
    magic, version, segment_size, salt, prefix, key_check, key_id_length = _FIXED_HEADER.unpack(fixed)
    if magic != MAGIC:
        raise StreamFormatInvalid(f"文件标识 {magic!r} 不是 {MAGIC!r}")
    if version != VERSION:
        raise StreamFormatInvalid(f"格式版本 {version} 不受支持，本程序支持版本 {VERSION}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise StreamFormatInvalid(f"分段大小 {segment_size} 超出允许范围")
    key_id_bytes = _read_exact(src, key_id_length)
    if key_id_length == 0 or len(key_id_bytes) < key_id_length:
        raise StreamFormatInvalid("密钥标识缺失或不完整")
    try:
        key_id = key_id_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise StreamFormatInvalid("密钥标识不是合法的 UTF-8") from None
    return StreamHeader(segment_size, salt, prefix, key_check, key_id, fixed + key_id_bytes)


# --- parallel segments ------------------------------------------------------------------------

_Result = TypeVar("_Result")


def _ordered_map(
    function: Callable[..., _Result], arguments: Iterable[tuple], workers: int
) -> Iterator[_Result]:
    """Yield ``function(*args)`` for each item of ``arguments`` in order, on ``workers`` threads.

    At most ``2 * workers`` calls are in flight. When reading ``arguments`` fails, the
    results of the items read before are yielded first, so errors surface in segment order.
    """
    if workers <= 1:
        for item in arguments:
            yield function(*item)
        return

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sm4-stream")
    pending: deque[Future[_Result]] = deque()
    producer_error: Exception | None = None
    try:
        iterator = iter(arguments)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception as error:  # re-raised below, after the earlier segments
                producer_error = error
                break
            pending.append(pool.submit(function, *item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        if producer_error is not None:
            raise producer_error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_workers(workers: int) -> int:
    if not isinstance(workers, int) or workers < 1:
        raise RegsandboxError(
            "stream_workers_invalid", f"并行线程数 {workers!r} 无效，应为不小于 1 的整数。"
        )
    return workers


# --- encryption ----------------------------------------------------------------------------------


def _encrypt_segment(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """Return (ciphertext, tag), kept apart so a 1 MiB segment is not copied to append 16 bytes."""
    encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(aad)
    ciphertext = encryptor.update(plaintext)
    encryptor.finalize()  # GCM has no buffered bytes, so finalize returns b""
    return ciphertext, encryptor.tag


def _plaintext_segments(src: BinaryIO, segment_size: int) -> Iterator[tuple[bytes, bool]]:
    """Yield (segment, is_last), reading one segment ahead to know which one is last."""
    current = _read_exact(src, segment_size)
    while True:
        following = _read_exact(src, segment_size) if len(current) == segment_size else b""
        is_last = not following
        yield current, is_last
        if is_last:
            return
        current = following


def encrypt_stream(
    key: bytes,
    key_id: str,
    src: BinaryIO,
    dst: BinaryIO,
    associated_data: bytes = b"",
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    workers: int = DEFAULT_WORKERS,
) -> StreamHeader:
    """Encrypt ``src`` into ``dst`` segment by segment and return the header written.

    ``key`` is the 16-byte data key and ``key_id`` names it with its version so that a
    reader can find it again. ``associated_data`` is authenticated but not stored, so the
    reader must supply the same bytes. Segments are encrypted on ``workers`` threads, and
    at most about ``4 * workers + 2`` segment buffers are in memory whatever the input size.
    """
    key = _check_key(key)
    _check_segment_size(segment_size)
    workers = _check_workers(workers)
    header, segment_key = _build_header(key, key_id, segment_size)
    aad = _segment_aad(header.raw, associated_data)
    dst.write(header.raw)

    def jobs() -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
        for index, (plaintext, is_last) in enumerate(_plaintext_segments(src, segment_size)):
            if index >= MAX_SEGMENTS:
                raise RegsandboxError(
                    "stream_too_large",
                    f"文件超过 {MAX_SEGMENTS} 段的上限，请增大分段大小（当前 {segment_size} 字节）。",
                )
            yield segment_key, _nonce(header.nonce_prefix, index, is_last), aad, plaintext

    for nonce_flag, (ciphertext, tag) in _ordered_map(_encrypt_segment_with_flag, jobs(), workers):
        dst.write(_RECORD_HEADER.pack(nonce_flag, len(ciphertext) + len(tag)))
        dst.write(ciphertext)
        dst.write(tag)
    return header


def _encrypt_segment_with_flag(
    key: bytes, nonce: bytes, aad: bytes, plaintext: bytes
) -> tuple[int, tuple[bytes, bytes]]:
    return nonce[-1], _encrypt_segment(key, nonce, aad, plaintext)


# --- decryption ----------------------------------------------------------------------------------


def _decrypt_segment(
    key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes, index: int
) -> bytes:
    tag = ciphertext[-GCM_TAG_SIZE:]
    decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad)
    plaintext = decryptor.update(memoryview(ciphertext)[:-GCM_TAG_SIZE])
    try:
        decryptor.finalize()  # GCM has no buffered bytes, so this only checks the tag
    except InvalidTag:
        raise CiphertextTampered(index) from None
    return plaintext


def _read_record(src: BinaryIO, header: StreamHeader, index: int) -> tuple[bytes, bool]:
    """Read one segment record, check its framing and return (ciphertext, is_last)."""
    record_header = _read_exact(src, _RECORD_HEADER.size)
    if len(record_header) < _RECORD_HEADER.size:
        raise CiphertextTruncated(index)
    flag, length = _RECORD_HEADER.unpack(record_header)
    full_length = header.segment_size + GCM_TAG_SIZE
    if flag not in (0, 1):
        raise CiphertextTampered(index, f"末段标志 {flag} 无效")
    if flag == 0 and length != full_length:
        raise CiphertextTampered(index, f"中间段长度 {length} 应为 {full_length}")
    if not GCM_TAG_SIZE <= length <= full_length:
        raise CiphertextTampered(index, f"段长度 {length} 超出范围")
    ciphertext = _read_exact(src, length)
    if len(ciphertext) < length:
        raise CiphertextTruncated(index)
    return ciphertext, flag == 1


def decrypt_stream(
    key: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    associated_data: bytes = b"",
    *,
    key_id: str | None = None,
    workers: int = DEFAULT_WORKERS,
) -> StreamHeader:
    """Decrypt a stream from :func:`encrypt_stream` into ``dst`` and return its header.

    Each segment is written only after its tag verifies. An error can still come after
    earlier segments were written (truncation is seen at the end), so ``dst`` must be a
    temporary file that the caller discards on error; :func:`decrypt_file` does this.
    When ``key_id`` is given, a file written under another key ID raises :class:`WrongKey`.

    Raises :class:`StreamFormatInvalid`, :class:`WrongKey`, :class:`CiphertextTampered`,
    :class:`CiphertextTruncated` or :class:`CiphertextTrailingData`. Segment errors are
    raised in segment order, whichever worker thread finds them first.
    """
    key = _check_key(key)
    workers = _check_workers(workers)
    header = read_stream_header(src)
    if key_id is not None and header.key_id != key_id:
        raise WrongKey(f"文件使用密钥 {header.key_id!r} 加密，而调用方提供的是 {key_id!r}")
    segment_key, key_check = _derive_keys(key, header.salt)
    if not secrets.compare_digest(key_check, header.key_check):
        raise WrongKey(f"数据密钥与文件（密钥标识 {header.key_id!r}）不符，或文件头的盐值被篡改")
    aad = _segment_aad(header.raw, associated_data)

    def jobs() -> Iterator[tuple[bytes, bytes, bytes, bytes, int]]:
        for index in range(MAX_SEGMENTS):
            ciphertext, is_last = _read_record(src, header, index)
            yield segment_key, _nonce(header.nonce_prefix, index, is_last), aad, ciphertext, index
            if is_last:
                return
        raise CiphertextTampered(MAX_SEGMENTS, "段数超过上限")

    for plaintext in _ordered_map(_decrypt_segment, jobs(), workers):
        dst.write(plaintext)

    if src.read(1):
        raise CiphertextTrailingData()
    return header


# --- files -------------------------------------------------------------------------------------


def encrypt_file(
    key: bytes,
    key_id: str,
    src_path: Path | str,
    dst_path: Path | str,
    associated_data: bytes = b"",
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    workers: int = DEFAULT_WORKERS,
) -> StreamHeader:
    """Encrypt a file into ``dst_path``, which appears only once it is complete."""
    with open(src_path, "rb") as src, atomic_output(Path(dst_path)) as dst:
        return encrypt_stream(
            key, key_id, src, dst, associated_data, segment_size=segment_size, workers=workers
        )


def decrypt_file(
    key: bytes,
    src_path: Path | str,
    dst_path: Path | str,
    associated_data: bytes = b"",
    *,
    key_id: str | None = None,
    workers: int = DEFAULT_WORKERS,
) -> StreamHeader:
    """Decrypt a file into ``dst_path``, which appears only after every segment verified.

    On any error the temporary output is deleted and ``dst_path`` is left as it was.
    """
    with open(src_path, "rb") as src, atomic_output(Path(dst_path)) as dst:
        return decrypt_stream(key, src, dst, associated_data, key_id=key_id, workers=workers)
