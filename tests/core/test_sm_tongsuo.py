"""Cross-checks of regsandbox_core.sm against tongsuopy, an OpenSSL-based SM2/SM3/SM4 library.

tongsuopy signs with the GM/T 0009 default user ID "1234567812345678", the same default
as :data:`regsandbox_core.sm.SM2_DEFAULT_USER_ID`. sm2_sign and sm2_verify call tongsuopy
themselves, so the SM2 checks here pair tongsuopy with the module's gmssl path
(``_gmssl_sign``, ``_gmssl_verify`` and ``_gmssl_public_key``), which shares no arithmetic
with OpenSSL.
"""

from __future__ import annotations

import secrets

import pytest
from tongsuopy.crypto import hashes as tongsuo_hashes
from tongsuopy.crypto.asymciphers import ec as tongsuo_ec
from tongsuopy.crypto.ciphers import aead as tongsuo_aead

from regsandbox_core import sm

MESSAGE = b"cross check between libraries"


@pytest.fixture(scope="module")
def keypair() -> sm.Sm2KeyPair:
    return sm.generate_sm2_keypair()


def tongsuo_public_key(public_key: bytes) -> tongsuo_ec.EllipticCurvePublicKey:
    numbers = tongsuo_ec.EllipticCurvePublicNumbers(
        int.from_bytes(public_key[1:33], "big"), int.from_bytes(public_key[33:], "big"), tongsuo_ec.SM2()
    )
    return numbers.public_key()


def test_sm3_agrees_with_tongsuo():
    for message in [b"", b"abc", b"abcd" * 16, bytes(range(256)) * 9]:
        digest = tongsuo_hashes.Hash(tongsuo_hashes.SM3())
        digest.update(message)
        assert digest.finalize() == sm.sm3_digest(message)


def test_sm4_gcm_agrees_with_tongsuo():
    key, nonce = bytes(range(16)), bytes(range(12))
    ours = sm.sm4_gcm_encrypt(key, nonce, b"x" * 1000, b"header")
    assert tongsuo_aead.SM4GCM(key).encrypt(nonce, b"x" * 1000, b"header") == ours
    assert tongsuo_aead.SM4GCM(key).decrypt(nonce, ours, b"header") == b"x" * 1000


def test_sm4_gcm_decrypts_tongsuo_output():
    key, nonce = sm.generate_sm4_key(), bytes(12)
    sealed = tongsuo_aead.SM4GCM(key).encrypt(nonce, b"from tongsuo", b"ad")
    assert sm.sm4_gcm_decrypt(key, nonce, sealed, b"ad") == b"from tongsuo"


def tongsuo_signature(private_key: bytes) -> bytes:
    key = tongsuo_ec.derive_private_key(int.from_bytes(private_key, "big"), tongsuo_ec.SM2())
    return key.sign(MESSAGE, tongsuo_ec.ECDSA(tongsuo_hashes.SM3()))


def test_sm2_public_key_agrees_with_tongsuo(keypair):
    private_key = tongsuo_ec.derive_private_key(int.from_bytes(keypair.private_key, "big"), tongsuo_ec.SM2())
    numbers = private_key.public_key().public_numbers()
    gmssl_public_key = sm._gmssl_public_key(keypair.private_key, sm.SM2_CURVE)
    assert numbers.x == int.from_bytes(gmssl_public_key[1:33], "big")
    assert numbers.y == int.from_bytes(gmssl_public_key[33:], "big")


def test_sm2_gmssl_signature_verifies_in_tongsuo(keypair):
    nonce = 1 + secrets.randbelow(int(sm.SM2_CURVE["n"], 16) - 2)
    signature = sm._gmssl_sign(keypair.private_key, MESSAGE, sm.SM2_DEFAULT_USER_ID, sm.SM2_CURVE, nonce=nonce)
    tongsuo_public_key(keypair.public_key).verify(signature, MESSAGE, tongsuo_ec.ECDSA(tongsuo_hashes.SM3()))


def test_sm2_gmssl_verifies_tongsuo_signature(keypair):
    signature = tongsuo_signature(keypair.private_key)
    sm._gmssl_verify(keypair.public_key, MESSAGE, signature, sm.SM2_DEFAULT_USER_ID, sm.SM2_CURVE)


def test_sm2_verifies_tongsuo_signature(keypair):
    sm.sm2_verify(keypair.public_key, MESSAGE, tongsuo_signature(keypair.private_key))


def test_sm2_tongsuo_signature_binds_message(keypair):
    signature = tongsuo_signature(keypair.private_key)
    with pytest.raises(sm.SignatureInvalid):
        sm._gmssl_verify(keypair.public_key, MESSAGE + b"!", signature, sm.SM2_DEFAULT_USER_ID, sm.SM2_CURVE)
    with pytest.raises(sm.SignatureInvalid):
        sm.sm2_verify(keypair.public_key, MESSAGE + b"!", signature)
