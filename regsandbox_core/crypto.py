"""SM3 digests and HMAC-SM3 keyed tokens (GB/T 32905), from the ``cryptography`` package."""

from __future__ import annotations

import hmac as _hmac
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _crypto_hmac

_CHUNK = 1 << 20


def sm3_hex(data: bytes) -> str:
    """Return the SM3 digest of ``data`` as 64 lowercase hex characters."""
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize().hex()


def sm3_file(path: Path) -> str:
    """Return the SM3 digest of a file, read in 1 MiB chunks so memory stays constant."""
    digest = hashes.Hash(hashes.SM3())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.finalize().hex()


def hmac_sm3(key: bytes, data: bytes) -> bytes:
    """Return the 32-byte HMAC-SM3 of ``data`` under ``key``."""
    mac = _crypto_hmac.HMAC(key, hashes.SM3())
    mac.update(data)
    return mac.finalize()


TOKEN_SIZE = 16
"""Bytes of a token: the first 128 bits of the HMAC-SM3, the half of the digest that RFC 2104 sets
as the least to keep. Written as 32 hex digits. A collision among 10^9 values has a chance of about
10^-21, and extracts store and join half the bytes of the full digest."""


TOKEN_SCHEME = "hmac-sm3-128-hex"
"""Name of the token format of :func:`keyed_token`. Extract tables record it among their inputs, so a
table with tokens of another format (64 hex digits before 2026-12-05) is masked again, never merged."""


def keyed_token(key: bytes, value: str) -> str:
    """Return the token of a personal identifier: HMAC-SM3 under the institution's key, truncated to :data:`TOKEN_SIZE` bytes, hex.

    The same value gives the same token under one key and unrelated tokens under two keys,
    so records join within an institution and not across institutions.
    """
    return hmac_sm3(key, value.encode("utf-8"))[:TOKEN_SIZE].hex()


def constant_time_equal(left: str, right: str) -> bool:
    """Compare two secrets without leaking their common prefix through timing."""
    return _hmac.compare_digest(left.encode("utf-8"), right.encode("utf-8"))
