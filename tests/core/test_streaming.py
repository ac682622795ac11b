"""Segmented SM4-GCM streams: round trips, and every tampering case raising its own error."""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import pytest

from regsandbox_core import streaming
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.sm import KeyInvalid

SEGMENT = 4096
KEY = bytes(range(16))
KEY_ID = "inst-001/v1"
AAD = b"extract:inst-001:2026-12-04"
CHINESE = re.compile(r"[\u4e00-\u9fff]")


def encrypt(plaintext: bytes, *, key: bytes = KEY, aad: bytes = AAD) -> bytes:
    output = io.BytesIO()
    streaming.encrypt_stream(key, KEY_ID, io.BytesIO(plaintext), output, aad, segment_size=SEGMENT)
    return output.getvalue()


def decrypt(ciphertext: bytes, *, key: bytes = KEY, aad: bytes = AAD, key_id: str | None = None) -> bytes:
    output = io.BytesIO()
    streaming.decrypt_stream(key, io.BytesIO(ciphertext), output, aad, key_id=key_id)
    return output.getvalue()


def split(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    """Return the header and the list of whole segment records of a stream."""
    source = io.BytesIO(ciphertext)
    header = streaming.read_stream_header(source).raw
    records = []
    while record_header := source.read(5):
        _, length = struct.unpack(">BI", record_header)
        records.append(record_header + source.read(length))
    return header, records


class ShortReads(io.RawIOBase):
    """A stream that returns at most 1000 bytes per read, like a pipe or socket."""

    def __init__(self, data: bytes) -> None:
        self._source = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._source.read(min(size, 1000) if size >= 0 else 1000)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 5 * SEGMENT + 123],
    ids=["empty", "one_byte", "segment_minus_1", "segment", "segment_plus_1", "three_segments", "several"],
)
def test_stream_round_trip(size):
    plaintext = os.urandom(size)
    ciphertext = encrypt(plaintext)
    assert decrypt(ciphertext) == plaintext
    _, records = split(ciphertext)
    assert len(records) == max(1, -(-size // SEGMENT))


@pytest.mark.parametrize("workers", [1, 3])
def test_stream_round_trip_any_workers(workers):
    plaintext = os.urandom(9 * SEGMENT + 7)
    output = io.BytesIO()
    streaming.encrypt_stream(KEY, KEY_ID, io.BytesIO(plaintext), output, segment_size=SEGMENT, workers=workers)
    result = io.BytesIO()
    streaming.decrypt_stream(KEY, io.BytesIO(output.getvalue()), result, workers=4 - workers)
    assert result.getvalue() == plaintext


def test_stream_header_names_key():
    header = streaming.read_stream_header(io.BytesIO(encrypt(b"x")))
    assert header.key_id == KEY_ID
    assert header.segment_size == SEGMENT


def test_stream_encryptions_differ():
    first, second = encrypt(b"same plaintext"), encrypt(b"same plaintext")
    assert first != second
    first_header = streaming.read_stream_header(io.BytesIO(first))
    second_header = streaming.read_stream_header(io.BytesIO(second))
    assert first_header.salt != second_header.salt


def test_stream_survives_short_reads():
    plaintext = os.urandom(3 * SEGMENT + 17)
    output = io.BytesIO()
    streaming.encrypt_stream(KEY, KEY_ID, ShortReads(plaintext), output, AAD, segment_size=SEGMENT)
    result = io.BytesIO()
    streaming.decrypt_stream(KEY, ShortReads(output.getvalue()), result, AAD)
    assert result.getvalue() == plaintext


def test_file_round_trip_default_segment(tmp_path):
    plaintext = os.urandom(streaming.DEFAULT_SEGMENT_SIZE + 1)
    (tmp_path / "plain.csv").write_bytes(plaintext)
    streaming.encrypt_file(KEY, KEY_ID, tmp_path / "plain.csv", tmp_path / "data.enc", AAD)
    header = streaming.decrypt_file(KEY, tmp_path / "data.enc", tmp_path / "out.csv", AAD, key_id=KEY_ID)
    assert (tmp_path / "out.csv").read_bytes() == plaintext
    assert header.segment_size == streaming.DEFAULT_SEGMENT_SIZE
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.enc", "out.csv", "plain.csv"]


def test_decrypted_file_is_private(tmp_path):
    (tmp_path / "data.enc").write_bytes(encrypt(b"secret"))
    streaming.decrypt_file(KEY, tmp_path / "data.enc", tmp_path / "out", AAD)
    assert (tmp_path / "out").stat().st_mode & 0o077 == 0


# --- tampering ---------------------------------------------------------------------------------


def drop_last_segment(ciphertext: bytes) -> bytes:
    header, records = split(ciphertext)
    return header + b"".join(records[:-1])


def cut_inside_last_segment(ciphertext: bytes) -> bytes:
    return ciphertext[:-10]


def cut_after_header(ciphertext: bytes) -> bytes:
    header, _ = split(ciphertext)
    return header


def swap_segments(ciphertext: bytes) -> bytes:
    header, records = split(ciphertext)
    records[0], records[1] = records[1], records[0]
    return header + b"".join(records)


def segment_from_other_file(ciphertext: bytes) -> bytes:
    header, records = split(ciphertext)
    _, other_records = split(encrypt(b"\x00" * (3 * SEGMENT + 10)))
    records[1] = other_records[1]
    return header + b"".join(records)


def flip_segment_byte(ciphertext: bytes) -> bytes:
    header, records = split(ciphertext)
    altered = bytearray(records[1])
    altered[100] ^= 0x01
    records[1] = bytes(altered)
    return header + b"".join(records)


def clear_last_flag(ciphertext: bytes) -> bytes:
    header, records = split(ciphertext)
    records[-1] = b"\x00" + records[-1][1:]
    return header + b"".join(records)


def promote_previous_segment(ciphertext: bytes) -> bytes:
    header, records = split(ciphertext)
    return header + b"".join(records[:-2]) + b"\x01" + records[-2][1:]


def edit_header_field(offset: int):
    def edit(ciphertext: bytes) -> bytes:
        altered = bytearray(ciphertext)
        altered[offset] ^= 0x01
        return bytes(altered)

    return edit


def append_garbage(ciphertext: bytes) -> bytes:
    return ciphertext + b"\x00garbage"


def append_copy_of_last_segment(ciphertext: bytes) -> bytes:
    _, records = split(ciphertext)
    return ciphertext + records[-1]


# Header offsets: magic 0-3, version 4, segment size 5-8, salt 9-24, nonce prefix 25-31,
# key check 32-47, key ID length 48, key ID from 49.
TAMPER_CASES = [
    ("drop_last_segment", drop_last_segment, streaming.CiphertextTruncated, "ciphertext_truncated"),
    ("cut_inside_segment", cut_inside_last_segment, streaming.CiphertextTruncated, "ciphertext_truncated"),
    ("cut_after_header", cut_after_header, streaming.CiphertextTruncated, "ciphertext_truncated"),
    ("swap_segments", swap_segments, streaming.CiphertextTampered, "ciphertext_tampered"),
    ("segment_from_other_file", segment_from_other_file, streaming.CiphertextTampered, "ciphertext_tampered"),
    ("flip_segment_byte", flip_segment_byte, streaming.CiphertextTampered, "ciphertext_tampered"),
    ("clear_last_flag", clear_last_flag, streaming.CiphertextTampered, "ciphertext_tampered"),
    ("promote_previous_segment", promote_previous_segment, streaming.CiphertextTampered, "ciphertext_tampered"),
    ("edit_magic", edit_header_field(0), streaming.StreamFormatInvalid, "stream_format_invalid"),
    ("edit_version", edit_header_field(4), streaming.StreamFormatInvalid, "stream_format_invalid"),
    ("edit_segment_size", edit_header_field(8), streaming.CiphertextTampered, "ciphertext_tampered"),
    ("edit_salt", edit_header_field(9), streaming.WrongKey, "stream_wrong_key"),
    ("edit_nonce_prefix", edit_header_field(25), streaming.CiphertextTampered, "ciphertext_tampered"),
    ("edit_key_check", edit_header_field(32), streaming.WrongKey, "stream_wrong_key"),
    ("edit_key_id", edit_header_field(50), streaming.CiphertextTampered, "ciphertext_tampered"),
    ("append_garbage", append_garbage, streaming.CiphertextTrailingData, "ciphertext_trailing_data"),
    ("append_copy_of_last", append_copy_of_last_segment, streaming.CiphertextTrailingData, "ciphertext_trailing_data"),
]


@pytest.fixture(scope="module")
def original() -> tuple[bytes, bytes]:
    plaintext = os.urandom(3 * SEGMENT + 500)
    return plaintext, encrypt(plaintext)


@pytest.mark.parametrize(
    ("tamper", "error", "code"),
    [case[1:] for case in TAMPER_CASES],
    ids=[case[0] for case in TAMPER_CASES],
)
def test_decrypt_file_detects_tampering(tmp_path, original, tamper, error, code):
    _, ciphertext = original
    altered = tamper(ciphertext)
    assert altered != ciphertext
    (tmp_path / "data.enc").write_bytes(altered)

    with pytest.raises(error) as caught:
        streaming.decrypt_file(KEY, tmp_path / "data.enc", tmp_path / "out.csv", AAD)

    assert caught.value.code == code
    assert CHINESE.search(caught.value.message)
    assert [path.name for path in tmp_path.iterdir()] == ["data.enc"]


def test_segment_error_names_segment(original):
    _, ciphertext = original
    with pytest.raises(streaming.CiphertextTampered) as caught:
        decrypt(flip_segment_byte(ciphertext))
    assert caught.value.segment_index == 1
    assert "第 1 段" in caught.value.message


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_errors_raised_in_segment_order(original, workers):
    _, ciphertext = original
    header, records = split(ciphertext)
    first = bytearray(records[0])
    first[50] ^= 0x01
    altered = header + bytes(first) + b"".join(records[1:-1])  # also cut before the last segment
    output = io.BytesIO()
    with pytest.raises(streaming.CiphertextTampered) as caught:
        streaming.decrypt_stream(KEY, io.BytesIO(altered), output, AAD, workers=workers)
    assert caught.value.segment_index == 0
    assert output.getvalue() == b""


def test_wrong_key_detected(original):
    _, ciphertext = original
    with pytest.raises(streaming.WrongKey) as caught:
        decrypt(ciphertext, key=bytes(16))
    assert caught.value.code == "stream_wrong_key"


def test_other_key_id_rejected(original):
    _, ciphertext = original
    with pytest.raises(streaming.WrongKey) as caught:
        decrypt(ciphertext, key_id="inst-001/v2")
    assert "inst-001/v1" in caught.value.message


def test_other_associated_data_rejected(original):
    _, ciphertext = original
    with pytest.raises(streaming.CiphertextTampered) as caught:
        decrypt(ciphertext, aad=b"extract:inst-002:2026-12-04")
    assert caught.value.segment_index == 0


def test_not_a_stream_rejected(tmp_path):
    (tmp_path / "plain.csv").write_bytes(b"id,amount\n1,100\n" * 10)
    with pytest.raises(streaming.StreamFormatInvalid):
        streaming.decrypt_file(KEY, tmp_path / "plain.csv", tmp_path / "out.csv", AAD)
    assert not (tmp_path / "out.csv").exists()


def test_failed_decrypt_keeps_existing_destination(tmp_path, original):
    _, ciphertext = original
    (tmp_path / "data.enc").write_bytes(drop_last_segment(ciphertext))
    (tmp_path / "out.csv").write_bytes(b"previous version")
    with pytest.raises(streaming.CiphertextTruncated):
        streaming.decrypt_file(KEY, tmp_path / "data.enc", tmp_path / "out.csv", AAD)
    assert (tmp_path / "out.csv").read_bytes() == b"previous version"


# --- bad arguments -----------------------------------------------------------------------------


def test_encrypt_rejects_short_key():
    with pytest.raises(KeyInvalid) as caught:
        encrypt(b"x", key=bytes(8))
    assert caught.value.code == "sm4_key_invalid"


@pytest.mark.parametrize("key_id", ["", "k" * 256])
def test_encrypt_rejects_bad_key_id(key_id):
    with pytest.raises(RegsandboxError) as caught:
        streaming.encrypt_stream(KEY, key_id, io.BytesIO(b"x"), io.BytesIO())
    assert caught.value.code == "stream_key_id_invalid"


@pytest.mark.parametrize("segment_size", [0, 255, (64 << 20) + 1])
def test_encrypt_rejects_bad_segment_size(segment_size):
    with pytest.raises(RegsandboxError) as caught:
        streaming.encrypt_stream(KEY, KEY_ID, io.BytesIO(b"x"), io.BytesIO(), segment_size=segment_size)
    assert caught.value.code == "stream_segment_size_invalid"


@pytest.mark.parametrize("workers", [0, -1, 1.5])
def test_stream_rejects_bad_workers(workers):
    with pytest.raises(RegsandboxError) as caught:
        streaming.encrypt_stream(KEY, KEY_ID, io.BytesIO(b"x"), io.BytesIO(), workers=workers)
    assert caught.value.code == "stream_workers_invalid"


def test_encrypt_file_leaves_nothing_on_error(tmp_path):
    (tmp_path / "plain.csv").write_bytes(b"x")
    with pytest.raises(RegsandboxError):
        streaming.encrypt_file(KEY, "", tmp_path / "plain.csv", tmp_path / "data.enc")
    assert [path.name for path in tmp_path.iterdir()] == ["plain.csv"]


def test_encrypt_file_accepts_str_paths(tmp_path):
    source = tmp_path / "plain.csv"
    source.write_bytes(b"abc")
    streaming.encrypt_file(KEY, KEY_ID, str(source), str(tmp_path / "data.enc"))
    streaming.decrypt_file(KEY, str(tmp_path / "data.enc"), str(tmp_path / "out"))
    assert Path(tmp_path / "out").read_bytes() == b"abc"
