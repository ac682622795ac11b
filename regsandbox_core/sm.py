"""Commercial cryptography primitives: SM4-GCM, SM4 blocks, SM2 signatures and SM2 encryption.

SM4 (GB/T 32907) and SM3 (GB/T 32905) come from ``cryptography``, which calls OpenSSL.

SM2 signing, verification and public-key derivation (GB/T 32918.2) run in C through
``tongsuopy`` 1.0.1, whose wheel bundles Tongsuo 8.3.2 (an OpenSSL 1.1.1 fork). Tongsuo
draws the signing nonce k from OpenSSL's private DRBG (``BN_priv_rand_range``). tongsuopy
offers no way to set the GM/T 0009 user ID, so Tongsuo always hashes the default ID
1234567812345678 into Z_A, and :func:`sm2_sign` and :func:`sm2_verify` reject any other
ID. The platform signs only with the default ID, and ``signing.py`` records and checks it.

SM2 encryption and decryption (GB/T 32918.4) use the pure-Python point arithmetic of
``gmssl`` 3.2.2. Two parts of gmssl are not used because they are unsafe: its random
scalars come from ``random.choice`` (not a CSPRNG), and ``CryptSM2.decrypt`` never compares
the C3 hash. This module draws every scalar from ``secrets`` and checks C3 itself. The gmssl
signature equations remain in ``_gmssl_sign`` and ``_gmssl_verify``, which take an explicit
curve, user ID and nonce. Known-answer tests and cross-checks against Tongsuo use them, and
no public function signs with them.

Encodings:

- SM2 public key: 65 bytes, ``04 || x || y`` (uncompressed point).
- SM2 private key: 32 bytes, big-endian integer d with 1 <= d <= n - 2.
- SM2 signature: DER ``SEQUENCE { r INTEGER, s INTEGER }`` as in GM/T 0009.
- SM2 ciphertext: ``C1 || C3 || C2`` with C1 as a 65-byte uncompressed point, C3 the
  32-byte SM3 hash and C2 as long as the plaintext (GB/T 32918.4 order C1C3C2).
- SM4-GCM: 16-byte key, 12-byte nonce, ciphertext followed by a 16-byte tag.

NOTE: gmssl's arithmetic runs on Python integers and is not constant time, so SM2
decryption may leak private-key bits through timing to a caller who can measure many calls.
Signing is not claimed constant time either. Tongsuo's ``sm2_sig_gen`` inverts 1 + d with
OpenSSL's constant-time ``ec_group_do_inverse_ord`` but multiplies d by r with plain
``BN_mod_mul``, and its timing has not been measured here. Tongsuo 8.3.2 is statically
linked into the tongsuopy wheel, so its fixes arrive only with a new tongsuopy release.
Neither library is a certified cryptographic module, so a deployment that must pass a
GB/T 39786 level 3 assessment replaces them with one.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from gmssl import sm2 as _gmssl_sm2
from tongsuopy.crypto import hashes as _tongsuo_hashes
from tongsuopy.crypto.asymciphers import ec as _tongsuo_ec
from tongsuopy.crypto.exceptions import InvalidSignature as _TongsuoInvalidSignature

from regsandbox_core.crypto import hmac_sm3, sm3_hex
from regsandbox_core.errors import RegsandboxError

__all__ = [
    "CryptoInputInvalid",
    "DecryptionFailed",
    "GCM_NONCE_SIZE",
    "GCM_TAG_SIZE",
    "KeyInvalid",
    "SM2_DEFAULT_USER_ID",
    "SM4_KEY_SIZE",
    "SignatureInvalid",
    "Sm2KeyPair",
    "generate_sm2_keypair",
    "generate_sm4_key",
    "hmac_sm3",
    "sm2_decrypt",
    "sm2_encrypt",
    "sm2_public_key_from_private",
    "sm2_sign",
    "sm2_verify",
    "sm2_za",
    "sm3_digest",
    "sm3_hex",
    "sm4_ecb_decrypt_block",
    "sm4_ecb_encrypt_block",
    "sm4_gcm_decrypt",
    "sm4_gcm_encrypt",
]

SM4_KEY_SIZE = 16
SM4_BLOCK_SIZE = 16
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16

# GM/T 0009 default user ID, used when the two parties agree on no other ID.
SM2_DEFAULT_USER_ID = b"1234567812345678"

# The recommended 256-bit curve of GB/T 32918.5, as hex strings in gmssl's table format.
SM2_CURVE: dict[str, str] = dict(_gmssl_sm2.default_ecc_table)

_COORDINATE_SIZE = 32
_PUBLIC_KEY_SIZE = 1 + 2 * _COORDINATE_SIZE
_SM3_SIZE = 32
_MAX_USER_ID_BYTES = 0xFFFF // 8  # ENTL is the ID length in bits, stored in 2 bytes
_MAX_SIGN_ATTEMPTS = 16

# tongsuopy names SM2 signing "ECDSA with SM3". On a key of the SM2 curve its EVP_PKEY has the
# SM2 alias type, so OpenSSL hashes Z_A || M and applies the SM2 equations, not ECDSA's.
_TONGSUO_SM2_SIGNATURE = _tongsuo_ec.ECDSA(_tongsuo_hashes.SM3())


class CryptoInputInvalid(RegsandboxError):
    """A value passed to a cryptographic function has the wrong type, length or range."""


class KeyInvalid(CryptoInputInvalid):
    """A key has the wrong length, or an SM2 public key is not a point on the curve."""


class SignatureInvalid(RegsandboxError):
    """An SM2 signature does not verify under the public key, message and user ID."""

    def __init__(self, reason: str = "签名值与消息或公钥不匹配") -> None:
        super().__init__(
            "sm2_signature_invalid",
            f"SM2 签名验证失败：{reason}。请确认使用签名方的公钥、原始消息和约定的用户标识（ID）。",
        )


class DecryptionFailed(RegsandboxError):
    """A ciphertext failed authentication: wrong key, wrong associated data or altered bytes."""

    def __init__(self, algorithm: str, reason: str = "认证标签校验失败") -> None:
        super().__init__(
            "decryption_failed",
            f"{algorithm} 解密失败：{reason}。密文可能被篡改，或使用了错误的密钥、附加认证数据。",
        )
        self.algorithm = algorithm


@dataclass(frozen=True)
class Sm2KeyPair:
    """An SM2 key pair: 32-byte private key and 65-byte uncompressed public key."""

    private_key: bytes
    public_key: bytes

    def __repr__(self) -> str:
        # The private key never appears in logs or tracebacks.
        return f"Sm2KeyPair(public_key={self.public_key.hex()})"


# --- SM3 -----------------------------------------------------------------------------------


def sm3_digest(data: bytes) -> bytes:
    """Return the 32-byte SM3 digest of ``data``."""
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


# --- SM4 -----------------------------------------------------------------------------------


def generate_sm4_key() -> bytes:
    """Return a new random 128-bit SM4 key from the operating system's CSPRNG."""
    return secrets.token_bytes(SM4_KEY_SIZE)


def _check_bytes(
    value: object, name: str, size: int, code: str, error: type[CryptoInputInvalid] = KeyInvalid
) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise error(code, f"{name} 必须是字节串，实际类型为 {type(value).__name__}。")
    if len(value) != size:
        raise error(
            code, f"{name} 长度必须为 {size} 字节，实际为 {len(value)} 字节。请检查密钥或参数来源。"
        )
    return bytes(value)


def _check_sm4_key(key: bytes) -> bytes:
    return _check_bytes(key, "SM4 密钥", SM4_KEY_SIZE, "sm4_key_invalid")


def _check_gcm_nonce(nonce: bytes) -> bytes:
    if not isinstance(nonce, (bytes, bytearray, memoryview)) or len(nonce) != GCM_NONCE_SIZE:
        size = len(nonce) if isinstance(nonce, (bytes, bytearray, memoryview)) else "非字节串"
        raise CryptoInputInvalid(
            "gcm_nonce_invalid",
            f"GCM 随机数（nonce）长度必须为 {GCM_NONCE_SIZE} 字节，实际为 {size}。",
        )
    return bytes(nonce)


def sm4_gcm_encrypt(
    key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes = b""
) -> bytes:
    """Encrypt with SM4-GCM and return ``ciphertext || tag`` (tag of 16 bytes).

    A nonce must never repeat under one key, because GCM loses confidentiality and
    integrity when it does. Callers draw random nonces or use a counter per key.
    """
    encryptor = Cipher(
        algorithms.SM4(_check_sm4_key(key)), modes.GCM(_check_gcm_nonce(nonce))
    ).encryptor()
    if associated_data:
        encryptor.authenticate_additional_data(associated_data)
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    return ciphertext + encryptor.tag


def sm4_gcm_decrypt(
    key: bytes, nonce: bytes, ciphertext_and_tag: bytes, associated_data: bytes = b""
) -> bytes:
    """Decrypt ``ciphertext || tag`` from :func:`sm4_gcm_encrypt`.

    Raises :class:`DecryptionFailed` when the tag does not verify, and then returns no
    plaintext.
    """
    key = _check_sm4_key(key)
    nonce = _check_gcm_nonce(nonce)
    if len(ciphertext_and_tag) < GCM_TAG_SIZE:
        raise DecryptionFailed(
            "SM4-GCM",
            f"密文长度 {len(ciphertext_and_tag)} 字节，短于 {GCM_TAG_SIZE} 字节的认证标签",
        )
    ciphertext = ciphertext_and_tag[:-GCM_TAG_SIZE]
    tag = ciphertext_and_tag[-GCM_TAG_SIZE:]
    decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
    if associated_data:
        decryptor.authenticate_additional_data(associated_data)
    plaintext = decryptor.update(ciphertext)
    try:
        return plaintext + decryptor.finalize()
    except InvalidTag:
        raise DecryptionFailed("SM4-GCM") from None


def sm4_ecb_encrypt_block(key: bytes, block: bytes) -> bytes:
    """Encrypt one 16-byte block with the bare SM4 block cipher (for known-answer tests)."""
    block = _check_bytes(block, "SM4 分组", SM4_BLOCK_SIZE, "sm4_block_invalid", CryptoInputInvalid)
    encryptor = Cipher(algorithms.SM4(_check_sm4_key(key)), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def sm4_ecb_decrypt_block(key: bytes, block: bytes) -> bytes:
    """Decrypt one 16-byte block with the bare SM4 block cipher (for known-answer tests)."""
    block = _check_bytes(block, "SM4 分组", SM4_BLOCK_SIZE, "sm4_block_invalid", CryptoInputInvalid)
    decryptor = Cipher(algorithms.SM4(_check_sm4_key(key)), modes.ECB()).decryptor()
    return decryptor.update(block) + decryptor.finalize()


# --- SM2 -----------------------------------------------------------------------------------


def _curve_int(curve: dict[str, str], name: str) -> int:
    return int(curve[name], 16)


def _point_hex(point: tuple[int, int]) -> str:
    return "%064x%064x" % point


def _point_from_hex(text: str | None) -> tuple[int, int] | None:
    """Convert gmssl's ``x || y`` hex output to integers, or None for the point at infinity."""
    if not text:
        return None
    return int(text[:64], 16), int(text[64:128], 16)


def _multiply(scalar: int, point: tuple[int, int], curve: dict[str, str]) -> tuple[int, int] | None:
    engine = _gmssl_sm2.CryptSM2(private_key="", public_key="", ecc_table=curve)
    return _point_from_hex(engine._kg(scalar, _point_hex(point)))


def _generator(curve: dict[str, str]) -> tuple[int, int]:
    g = curve["g"]
    return int(g[:64], 16), int(g[64:], 16)


def _is_on_curve(point: tuple[int, int], curve: dict[str, str]) -> bool:
    p = _curve_int(curve, "p")
    x, y = point
    if not (0 <= x < p and 0 <= y < p):
        return False
    return (y * y - (x * x * x + _curve_int(curve, "a") * x + _curve_int(curve, "b"))) % p == 0


def _decode_point(encoded: bytes, label: str, curve: dict[str, str]) -> tuple[int, int]:
    """Decode ``04 || x || y`` and check that the point lies on the curve.

    The cofactor of the SM2 curves is 1, so every point on the curve other than infinity
    is in the prime-order group and no further subgroup check is needed.
    """
    if not isinstance(encoded, (bytes, bytearray)) or len(encoded) != _PUBLIC_KEY_SIZE:
        size = len(encoded) if isinstance(encoded, (bytes, bytearray)) else type(encoded).__name__
        raise KeyInvalid(
            "sm2_point_invalid",
            f"{label}必须是 {_PUBLIC_KEY_SIZE} 字节的非压缩点（04 || x || y），实际为 {size}。",
        )
    if encoded[0] != 0x04:
        raise KeyInvalid(
            "sm2_point_invalid",
            f"{label}首字节必须为 0x04（非压缩点），实际为 0x{encoded[0]:02x}。",
        )
    point = (
        int.from_bytes(encoded[1 : 1 + _COORDINATE_SIZE], "big"),
        int.from_bytes(encoded[1 + _COORDINATE_SIZE :], "big"),
    )
    if not _is_on_curve(point, curve):
        raise KeyInvalid("sm2_point_invalid", f"{label}不是 SM2 曲线上的点，请检查数据来源。")
    return point


def _encode_point(point: tuple[int, int]) -> bytes:
    return b"\x04" + point[0].to_bytes(_COORDINATE_SIZE, "big") + point[1].to_bytes(
        _COORDINATE_SIZE, "big"
    )


def _decode_private_key(private_key: bytes, curve: dict[str, str]) -> int:
    key = _check_bytes(private_key, "SM2 私钥", _COORDINATE_SIZE, "sm2_private_key_invalid")
    d = int.from_bytes(key, "big")
    # d = n - 1 is excluded because signing divides by (1 + d) modulo n.
    if not 1 <= d <= _curve_int(curve, "n") - 2:
        raise KeyInvalid("sm2_private_key_invalid", "SM2 私钥必须在区间 [1, n-2] 内，请重新生成密钥对。")
    return d


def _random_scalar(curve: dict[str, str]) -> int:
    """Return a uniform random integer in [1, n - 2]."""
    return 1 + secrets.randbelow(_curve_int(curve, "n") - 2)


def _tongsuo_private_key(d: int) -> _tongsuo_ec.EllipticCurvePrivateKey:
    """Load d as a Tongsuo SM2 private key, which computes d * G in OpenSSL."""
    return _tongsuo_ec.derive_private_key(d, _tongsuo_ec.SM2())


def _tongsuo_public_key(encoded: bytes) -> _tongsuo_ec.EllipticCurvePublicKey:
    """Load a checked ``04 || x || y`` point as a Tongsuo SM2 public key.

    ``from_encoded_point`` still rejects points off the curve. It skips the n * Q
    multiplication of ``EC_KEY_check_key`` that loading from x and y runs, which takes about
    as long as the verification itself.
    """
    return _tongsuo_ec.EllipticCurvePublicKey.from_encoded_point(_tongsuo_ec.SM2(), encoded)


def _tongsuo_public_key_bytes(d: int) -> bytes:
    numbers = _tongsuo_private_key(d).public_key().public_numbers()
    return _encode_point((numbers.x, numbers.y))


def generate_sm2_keypair() -> Sm2KeyPair:
    """Generate an SM2 key pair on the recommended curve with a CSPRNG private key.

    The private key comes from ``secrets`` in [1, n - 2], and OpenSSL computes d * G.
    """
    d = _random_scalar(SM2_CURVE)
    return Sm2KeyPair(d.to_bytes(_COORDINATE_SIZE, "big"), _tongsuo_public_key_bytes(d))


def sm2_public_key_from_private(private_key: bytes) -> bytes:
    """Return the 65-byte public key ``d * G`` of an SM2 private key, computed in OpenSSL."""
    return _tongsuo_public_key_bytes(_decode_private_key(private_key, SM2_CURVE))


def _gmssl_public_key(private_key: bytes, curve: dict[str, str]) -> bytes:
    """Return ``d * G`` on any short Weierstrass curve with gmssl (for known-answer tests)."""
    d = _decode_private_key(private_key, curve)
    public_point = _multiply(d, _generator(curve), curve)
    assert public_point is not None
    return _encode_point(public_point)


def _check_user_id(user_id: bytes) -> bytes:
    if not isinstance(user_id, (bytes, bytearray)):
        raise CryptoInputInvalid(
            "sm2_user_id_invalid", f"SM2 用户标识（ID）必须是字节串，实际类型为 {type(user_id).__name__}。"
        )
    if len(user_id) > _MAX_USER_ID_BYTES:
        raise CryptoInputInvalid(
            "sm2_user_id_invalid",
            f"SM2 用户标识（ID）最长 {_MAX_USER_ID_BYTES} 字节，实际为 {len(user_id)} 字节。",
        )
    return bytes(user_id)


def _check_default_user_id(user_id: bytes) -> None:
    """Reject every user ID but the GM/T 0009 default, the only one tongsuopy 1.0.1 signs with."""
    user_id = _check_user_id(user_id)
    if user_id != SM2_DEFAULT_USER_ID:
        user_id_text = user_id[:64].decode("utf-8", "backslashreplace") + ("…" if len(user_id) > 64 else "")
        raise CryptoInputInvalid(
            "sm2_user_id_unsupported",
            f"SM2 用户标识（ID）“{user_id_text}”不受支持：本平台的 SM2 签名只使用 GM/T 0009 默认 ID "
            f"{SM2_DEFAULT_USER_ID.decode('ascii')}。请省略 user_id 参数，或与对方约定使用默认 ID。",
        )


def _za(public_point: tuple[int, int], user_id: bytes, curve: dict[str, str]) -> bytes:
    entl = (len(user_id) * 8).to_bytes(2, "big")
    fields = [
        _curve_int(curve, "a"),
        _curve_int(curve, "b"),
        *_generator(curve),
        *public_point,
    ]
    return sm3_digest(
        entl + user_id + b"".join(value.to_bytes(_COORDINATE_SIZE, "big") for value in fields)
    )


def sm2_za(public_key: bytes, user_id: bytes = SM2_DEFAULT_USER_ID) -> bytes:
    """Return Z_A = SM3(ENTL || ID || a || b || xG || yG || xA || yA) of GB/T 32918.2."""
    point = _decode_point(public_key, "SM2 公钥", SM2_CURVE)
    return _za(point, _check_user_id(user_id), SM2_CURVE)


def _message_digest(
    public_point: tuple[int, int], message: bytes, user_id: bytes, curve: dict[str, str]
) -> bytes:
    """Return e = SM3(Z_A || M), the value that SM2 signs."""
    return sm3_digest(_za(public_point, user_id, curve) + message)


def _sign_digest(d: int, digest: bytes, k: int, curve: dict[str, str]) -> bytes | None:
    """Sign the digest with gmssl's equations and nonce k, or return None when k must be redrawn."""
    engine = _gmssl_sm2.CryptSM2(
        private_key="%064x" % d, public_key="", ecc_table=curve, mode=1, asn1=True
    )
    signature_hex = engine.sign(digest, "%064x" % k)
    return bytes.fromhex(signature_hex) if signature_hex else None


def _gmssl_sign(
    private_key: bytes,
    message: bytes,
    user_id: bytes,
    curve: dict[str, str],
    nonce: int,
) -> bytes:
    """Sign with gmssl's equations and the given nonce k on any curve and with any user ID.

    Only known-answer tests and cross-checks call this, because a caller-chosen k that
    repeats or leaks reveals the private key. :func:`sm2_sign` signs in OpenSSL instead.
    """
    d = _decode_private_key(private_key, curve)
    public_point = _multiply(d, _generator(curve), curve)
    assert public_point is not None
    digest = _message_digest(public_point, bytes(message), _check_user_id(user_id), curve)

    # gmssl returns None when r = 0, r + k = n or s = 0, which a fresh k would avoid.
    signature = _sign_digest(d, digest, nonce, curve)
    if signature is None:
        raise CryptoInputInvalid(
            "sm2_sign_failed", "SM2 签名计算失败：随机数 k 使 r = 0、r + k = n 或 s = 0，请换一个 k。"
        )
    return signature


def sm2_sign(
    private_key: bytes, message: bytes, *, user_id: bytes = SM2_DEFAULT_USER_ID
) -> bytes:
    """Sign ``message`` with SM2 in OpenSSL (SM3 digest over Z_A || M) and return a DER signature.

    OpenSSL draws a fresh nonce for every call, so two signatures of one message differ.
    ``user_id`` must be the GM/T 0009 default ID, because tongsuopy 1.0.1 cannot set another.
    Any other ID raises :class:`CryptoInputInvalid` with code ``sm2_user_id_unsupported``.
    """
    d = _decode_private_key(private_key, SM2_CURVE)
    _check_default_user_id(user_id)
    try:
        return _tongsuo_private_key(d).sign(bytes(message), _TONGSUO_SM2_SIGNATURE)
    except ValueError:
        # tongsuopy raises ValueError when EVP_DigestSign fails, for example when the DRBG fails.
        raise CryptoInputInvalid(
            "sm2_sign_failed", "SM2 签名计算失败：OpenSSL 签名函数返回错误。请重试；若持续失败，请检查系统随机数源。"
        ) from None


def _check_signature_encoding(signature: bytes, curve: dict[str, str]) -> bytes:
    """Accept only canonical DER with r and s in [1, n-1], so each signature has one encoding."""
    n = _curve_int(curve, "n")
    try:
        r, s = decode_dss_signature(bytes(signature))
    except (ValueError, TypeError):
        raise SignatureInvalid("签名不是合法的 DER 编码（SEQUENCE { r INTEGER, s INTEGER }）") from None
    if encode_dss_signature(r, s) != bytes(signature):
        raise SignatureInvalid("签名的 DER 编码不规范")
    if not (1 <= r < n and 1 <= s < n):
        raise SignatureInvalid("签名值 r 或 s 超出区间 [1, n-1]")
    return bytes(signature)


def _gmssl_verify(
    public_key: bytes,
    message: bytes,
    signature: bytes,
    user_id: bytes,
    curve: dict[str, str],
) -> None:
    """Verify with gmssl's equations on any curve and with any user ID (tests and cross-checks)."""
    public_point = _decode_point(public_key, "SM2 公钥", curve)
    signature = _check_signature_encoding(signature, curve)
    digest = _message_digest(public_point, bytes(message), _check_user_id(user_id), curve)
    engine = _gmssl_sm2.CryptSM2(private_key="", public_key="", ecc_table=curve, mode=1, asn1=True)
    # Set after construction: gmssl's constructor runs lstrip("04") on the key, which also
    # strips leading "0" and "4" digits of an x coordinate such as 04eb...
    engine.public_key = _point_hex(public_point)
    try:
        valid = engine.verify(bytes(signature).hex(), digest)
    except TypeError:
        # gmssl hits None when s*G + t*P is the point at infinity, which no valid signature gives.
        valid = False
    if not valid:
        raise SignatureInvalid()


def sm2_verify(
    public_key: bytes,
    message: bytes,
    signature: bytes,
    *,
    user_id: bytes = SM2_DEFAULT_USER_ID,
) -> None:
    """Verify a DER SM2 signature in OpenSSL and return None when it is valid.

    Raises :class:`SignatureInvalid` for a bad signature, :class:`KeyInvalid` for a
    public key that is not a point on the curve, and :class:`CryptoInputInvalid` for a
    ``user_id`` other than the GM/T 0009 default (see :func:`sm2_sign`).
    """
    _decode_point(public_key, "SM2 公钥", SM2_CURVE)
    # The Python checks come first because Tongsuo's verify returns -1, not 0, for
    # non-canonical DER, and tongsuopy turns -1 into an InternalError.
    signature = _check_signature_encoding(signature, SM2_CURVE)
    _check_default_user_id(user_id)
    try:
        _tongsuo_public_key(bytes(public_key)).verify(signature, bytes(message), _TONGSUO_SM2_SIGNATURE)
    except _TongsuoInvalidSignature:
        raise SignatureInvalid() from None


def _kdf(shared: bytes, length: int) -> bytes:
    # The SM2 KDF (GB/T 32918.4, 5.4.3) is SM3(Z || ct) with a 32-bit big-endian counter
    # starting at 1, which is the ANSI X9.63 KDF without shared info.
    return X963KDF(algorithm=hashes.SM3(), length=length, sharedinfo=None).derive(shared)


def _encrypt(
    public_key: bytes, plaintext: bytes, curve: dict[str, str], nonce: int | None = None
) -> bytes:
    public_point = _decode_point(public_key, "SM2 公钥", curve)
    plaintext = bytes(plaintext)
    if not plaintext:
        raise CryptoInputInvalid("sm2_plaintext_empty", "SM2 加密的明文不能为空。")

    for _ in range(_MAX_SIGN_ATTEMPTS):
        k = nonce if nonce is not None else _random_scalar(curve)
        c1 = _multiply(k, _generator(curve), curve)
        shared = _multiply(k, public_point, curve)
        assert c1 is not None and shared is not None  # k < n and the point has order n
        x2 = shared[0].to_bytes(_COORDINATE_SIZE, "big")
        y2 = shared[1].to_bytes(_COORDINATE_SIZE, "big")
        mask = _kdf(x2 + y2, len(plaintext))
        if any(mask):
            c2 = bytes(a ^ b for a, b in zip(plaintext, mask))
            c3 = sm3_digest(x2 + plaintext + y2)
            return _encode_point(c1) + c3 + c2
        if nonce is not None:
            break
    raise CryptoInputInvalid("sm2_encrypt_failed", "SM2 加密计算失败（随机数 k 不可用），请重试。")


def sm2_encrypt(public_key: bytes, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` to an SM2 public key and return ``C1 || C3 || C2``.

    The ciphertext is 97 bytes longer than the plaintext. SM2 encryption suits short
    values such as data keys; bulk data goes through SM4-GCM.
    """
    return _encrypt(public_key, plaintext, SM2_CURVE)


def _decrypt(private_key: bytes, ciphertext: bytes, curve: dict[str, str]) -> bytes:
    d = _decode_private_key(private_key, curve)
    ciphertext = bytes(ciphertext)
    header_size = _PUBLIC_KEY_SIZE + _SM3_SIZE
    if len(ciphertext) <= header_size:
        raise DecryptionFailed(
            "SM2", f"密文长度 {len(ciphertext)} 字节，至少应为 {header_size + 1} 字节（C1C3C2 格式）"
        )
    try:
        c1 = _decode_point(ciphertext[:_PUBLIC_KEY_SIZE], "C1 ", curve)
    except KeyInvalid:
        raise DecryptionFailed("SM2", "C1 不是曲线上的点") from None
    c3 = ciphertext[_PUBLIC_KEY_SIZE:header_size]
    c2 = ciphertext[header_size:]

    shared = _multiply(d, c1, curve)
    if shared is None:
        raise DecryptionFailed("SM2", "C1 与私钥的乘积为无穷远点")
    x2 = shared[0].to_bytes(_COORDINATE_SIZE, "big")
    y2 = shared[1].to_bytes(_COORDINATE_SIZE, "big")
    mask = _kdf(x2 + y2, len(c2))
    if not any(mask):
        raise DecryptionFailed("SM2", "密钥派生结果全为零")
    plaintext = bytes(a ^ b for a, b in zip(c2, mask))
    if not hmac.compare_digest(sm3_digest(x2 + plaintext + y2), c3):
        raise DecryptionFailed("SM2", "C3 杂凑值不匹配")
    return plaintext


def sm2_decrypt(private_key: bytes, ciphertext: bytes) -> bytes:
    """Decrypt a ``C1 || C3 || C2`` ciphertext, raising :class:`DecryptionFailed` when C3 differs."""
    return _decrypt(private_key, ciphertext, SM2_CURVE)
