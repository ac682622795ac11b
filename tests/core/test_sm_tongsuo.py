"""Cross-checks of regsandbox_core.sm against tongsuopy, an OpenSSL-based SM2/SM3/SM4 library.

tongsuopy signs with the GM/T 0009 default user ID "1234567812345678", the same default
as :data:`regsandbox_core.sm.SM2_DEFAULT_USER_ID`.
"""

from __future__ import annotations

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


def test_sm2_public_key_agrees_with_tongsuo(keypair):
    private_key = tongsuo_ec.derive_private_key(int.from_bytes(keypair.private_key, "big"), tongsuo_ec.SM2())
    numbers = private_key.public_key().public_numbers()
    assert numbers.x == int.from_bytes(keypair.public_key[1:33], "big")
    assert numbers.y == int.from_bytes(keypair.public_key[33:], "big")


def test_sm2_signature_verifies_in_tongsuo(keypair):
    signature = sm.sm2_sign(keypair.private_key, MESSAGE)
    tongsuo_public_key(keypair.public_key).verify(signature, MESSAGE, tongsuo_ec.ECDSA(tongsuo_hashes.SM3()))


def test_sm2_verifies_tongsuo_signature(keypair):
    private_key = tongsuo_ec.derive_private_key(int.from_bytes(keypair.private_key, "big"), tongsuo_ec.SM2())
    signature = private_key.sign(MESSAGE, tongsuo_ec.ECDSA(tongsuo_hashes.SM3()))
    sm.sm2_verify(keypair.public_key, MESSAGE, signature)


def test_sm2_tongsuo_signature_binds_message(keypair):
    private_key = tongsuo_ec.derive_private_key(int.from_bytes(keypair.private_key, "big"), tongsuo_ec.SM2())
    signature = private_key.sign(MESSAGE, tongsuo_ec.ECDSA(tongsuo_hashes.SM3()))
    with pytest.raises(sm.SignatureInvalid):
        sm.sm2_verify(keypair.public_key, MESSAGE + b"!", signature)
