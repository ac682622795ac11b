"""SM2, SM3 and SM4 primitives: published vectors, agreement with gmssl and rejected inputs.

sm2_sign and sm2_verify run in OpenSSL through tongsuopy, so the fixed-nonce vectors go
through the gmssl path of the module (``_gmssl_sign``), and the OpenSSL path is checked by
verifying the published signature and by verifying its own signatures with gmssl.

Vectors: SM3 from GB/T 32905-2016 appendix A; SM4 from GB/T 32907-2016 appendix A;
SM2 signatures from GB/T 32918.2-2016 appendix A (test curve) and, with encryption,
from GM/T 0003.5-2012 / GB/T 32918.5-2017 on the recommended curve.
"""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from gmssl import sm2 as gmssl_sm2
from gmssl import sm3 as gmssl_sm3
from gmssl import sm4 as gmssl_sm4

from regsandbox_core import crypto, sm

CHINESE = re.compile(r"[\u4e00-\u9fff]")

SM3_ABC = "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
SM3_ABCD_X16 = "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"

SM4_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
SM4_ONCE = bytes.fromhex("681edf34d206965e86b3e94f536e4246")
SM4_MILLION = bytes.fromhex("595298c7c6fd271f0402f804c33d3f66")

# GB/T 32918.2-2016 appendix A: the 256-bit test curve, not the recommended one.
TEST_CURVE = {
    "p": "8542D69E4C044F18E8B92435BF6FF7DE457283915C45517D722EDB8B08F1DFC3",
    "a": "787968B4FA32C3FD2417842E73BBFEFF2F3C848B6831D7E0EC65228B3937E498",
    "b": "63E4C6D3B23B0C849CF84241484BFE48F61D59A5B16BA06E6E12D1DA27C5249A",
    "g": "421DEBD61B62EAB6746434EBC3CC315E32220B3BADD50BDC4C4E6C147FEDD43D"
    "0680512BCBB42C07D47349D2153B70C4E5D7FDFCBFA36EA1A85841B9E46E09A2",
    "n": "8542D69E4C044F18E8B92435BF6FF7DD297720630485628D5AE74EE7C32E79B7",
}
TEST_CURVE_PRIVATE = bytes.fromhex("128B2FA8BD433C6C068C8D803DFF79792A519A55171B1B650C23661D15897263")
TEST_CURVE_PUBLIC = bytes.fromhex(
    "04"
    "0AE4C7798AA0F119471BEE11825BE46202BB79E2A5844495E97C04FF4DF2548A"
    "7C0240F88F1CD4E16352A73C17B7F16F07353E53A176D684A9FE0C6BB798E857"
)
TEST_CURVE_K = 0x6CB28D99385C175C94F94E934817663FC176D925DD72B727260DBAAE1FB2F96F
TEST_CURVE_R = 0x40F1EC59F793D9F49E09DCEF49130D4194F79FB1EED2CAA55BACDB49C4E755D1
TEST_CURVE_S = 0x6FC6DAC32C5D5CF10C77DFB20F7C2EB667A457872FB09EC56327A67EC7DEEBE7

# GM/T 0003.5-2012 on the recommended curve, default user ID.
ANNEX_PRIVATE = bytes.fromhex("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8")
ANNEX_PUBLIC = bytes.fromhex(
    "04"
    "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
    "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
)
ANNEX_K = 0x59276E27D506861A16680F3AD9C02DCCEF3CC1FA3CDBE4CE6D54B80DEAC1BC21
ANNEX_R = 0xF5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3
ANNEX_S = 0xB1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA
ANNEX_CIPHERTEXT = bytes.fromhex(
    "04"
    "04EBFC718E8D1798620432268E77FEB6415E2EDE0E073C0F4F640ECD2E149A73"
    "E858F9D81E5430A57B36DAAB8F950A3C64E6EE6A63094D99283AFF767E124DF0"
    "59983C18F809E262923C53AEC295D30383B54E39D609D160AFCB1908D0BD8766"
    "21886CA989CA9C7D58087307CA93092D651EFA"
)


@pytest.fixture(scope="module")
def keypair() -> sm.Sm2KeyPair:
    return sm.generate_sm2_keypair()


def gmssl_engine(public_key: bytes = b"", private_key: bytes = b"") -> gmssl_sm2.CryptSM2:
    engine = gmssl_sm2.CryptSM2(private_key=private_key.hex(), public_key="", mode=1, asn1=True)
    engine.public_key = public_key[1:].hex()  # gmssl's constructor mangles keys starting "04"
    return engine


def assert_user_facing(error: Exception, code: str) -> None:
    assert error.code == code
    assert CHINESE.search(error.message)


# --- SM3 -----------------------------------------------------------------------------------------


def test_sm3_abc_vector():
    assert sm.sm3_digest(b"abc").hex() == SM3_ABC


def test_sm3_512_bit_vector():
    assert sm.sm3_digest(b"abcd" * 16).hex() == SM3_ABCD_X16


def test_sm3_reexports_core_helpers():
    assert sm.sm3_hex is crypto.sm3_hex
    assert sm.hmac_sm3 is crypto.hmac_sm3


@pytest.mark.parametrize("message", [b"", b"abc", b"abcd" * 16, bytes(range(256)) * 9])
def test_sm3_cryptography_agrees_with_gmssl(message):
    assert sm.sm3_digest(message).hex() == gmssl_sm3.sm3_hash(list(message))


# --- SM4 -----------------------------------------------------------------------------------------


def test_sm4_block_vector():
    assert sm.sm4_ecb_encrypt_block(SM4_KEY, SM4_KEY) == SM4_ONCE
    assert sm.sm4_ecb_decrypt_block(SM4_KEY, SM4_ONCE) == SM4_KEY


@pytest.mark.slow
def test_sm4_million_iterations_vector():
    block = SM4_KEY
    for _ in range(1_000_000):
        block = sm.sm4_ecb_encrypt_block(SM4_KEY, block)
    assert block == SM4_MILLION


def test_sm4_block_agrees_with_gmssl():
    engine = gmssl_sm4.CryptSM4(padding_mode=None)  # neither PKCS7 nor ZERO: no padding
    for key, block in [(SM4_KEY, SM4_KEY), (bytes(range(16)), bytes(range(16, 32)))]:
        engine.set_key(key, gmssl_sm4.SM4_ENCRYPT)
        assert sm.sm4_ecb_encrypt_block(key, block) == engine.crypt_ecb(block)


def test_sm4_gcm_round_trip():
    key = sm.generate_sm4_key()
    nonce = bytes(12)
    sealed = sm.sm4_gcm_encrypt(key, nonce, b"loan ledger", b"inst-001")
    assert len(sealed) == len(b"loan ledger") + sm.GCM_TAG_SIZE
    assert sm.sm4_gcm_decrypt(key, nonce, sealed, b"inst-001") == b"loan ledger"


@pytest.mark.parametrize(
    "change",
    ["flip_ciphertext", "flip_tag", "other_aad", "other_key", "other_nonce", "too_short"],
)
def test_sm4_gcm_rejects_altered_input(change):
    key, nonce = bytes(16), bytes(12)
    sealed = bytearray(sm.sm4_gcm_encrypt(key, nonce, b"payload", b"ad"))
    arguments = {"key": key, "nonce": nonce, "ciphertext_and_tag": bytes(sealed), "associated_data": b"ad"}
    if change == "flip_ciphertext":
        sealed[0] ^= 1
        arguments["ciphertext_and_tag"] = bytes(sealed)
    elif change == "flip_tag":
        sealed[-1] ^= 1
        arguments["ciphertext_and_tag"] = bytes(sealed)
    elif change == "other_aad":
        arguments["associated_data"] = b"AD"
    elif change == "other_key":
        arguments["key"] = b"\x01" * 16
    elif change == "other_nonce":
        arguments["nonce"] = b"\x01" * 12
    else:
        arguments["ciphertext_and_tag"] = bytes(sealed[:15])
    with pytest.raises(sm.DecryptionFailed) as caught:
        sm.sm4_gcm_decrypt(**arguments)
    assert_user_facing(caught.value, "decryption_failed")


def test_sm4_rejects_short_key():
    with pytest.raises(sm.KeyInvalid) as caught:
        sm.sm4_gcm_encrypt(bytes(15), bytes(12), b"x")
    assert_user_facing(caught.value, "sm4_key_invalid")
    assert "15" in caught.value.message


def test_sm4_gcm_rejects_wrong_nonce_size():
    with pytest.raises(sm.CryptoInputInvalid) as caught:
        sm.sm4_gcm_encrypt(bytes(16), bytes(16), b"x")
    assert_user_facing(caught.value, "gcm_nonce_invalid")


# --- SM2 known-answer tests ----------------------------------------------------------------------


def test_sm2_test_curve_public_key():
    assert sm._gmssl_public_key(TEST_CURVE_PRIVATE, TEST_CURVE) == TEST_CURVE_PUBLIC


def test_sm2_test_curve_signature_vector():
    signature = sm._gmssl_sign(
        TEST_CURVE_PRIVATE, b"message digest", b"ALICE123@YAHOO.COM", TEST_CURVE, nonce=TEST_CURVE_K
    )
    assert decode_dss_signature(signature) == (TEST_CURVE_R, TEST_CURVE_S)
    sm._gmssl_verify(TEST_CURVE_PUBLIC, b"message digest", signature, b"ALICE123@YAHOO.COM", TEST_CURVE)


def test_sm2_recommended_curve_public_key():
    assert sm.sm2_public_key_from_private(ANNEX_PRIVATE) == ANNEX_PUBLIC
    assert sm._gmssl_public_key(ANNEX_PRIVATE, sm.SM2_CURVE) == ANNEX_PUBLIC


def test_sm2_recommended_curve_signature_vector():
    signature = sm._gmssl_sign(ANNEX_PRIVATE, b"message digest", sm.SM2_DEFAULT_USER_ID, sm.SM2_CURVE, nonce=ANNEX_K)
    assert decode_dss_signature(signature) == (ANNEX_R, ANNEX_S)


def test_sm2_verifies_published_signature():
    published = encode_dss_signature(ANNEX_R, ANNEX_S)
    assert sm.sm2_verify(ANNEX_PUBLIC, b"message digest", published) is None


def test_sm2_encryption_vector():
    ciphertext = sm._encrypt(ANNEX_PUBLIC, b"encryption standard", sm.SM2_CURVE, nonce=ANNEX_K)
    assert ciphertext == ANNEX_CIPHERTEXT


def test_sm2_decrypts_published_ciphertext():
    assert sm.sm2_decrypt(ANNEX_PRIVATE, ANNEX_CIPHERTEXT) == b"encryption standard"


def test_sm2_za_uses_explicit_user_id():
    default = sm.sm2_za(ANNEX_PUBLIC)
    assert default == sm.sm2_za(ANNEX_PUBLIC, b"1234567812345678")
    assert default != sm.sm2_za(ANNEX_PUBLIC, b"ALICE123@YAHOO.COM")


# --- SM2 round trips and cross-library checks ---------------------------------------------------


def test_sm2_keypair_is_valid(keypair):
    assert len(keypair.private_key) == 32
    assert len(keypair.public_key) == 65
    assert sm.sm2_public_key_from_private(keypair.private_key) == keypair.public_key
    assert keypair.private_key.hex() not in repr(keypair)


def test_sm2_openssl_public_key_agrees_with_gmssl(keypair):
    assert sm._gmssl_public_key(keypair.private_key, sm.SM2_CURVE) == keypair.public_key
    smallest, largest = (1).to_bytes(32, "big"), (int(sm.SM2_CURVE["n"], 16) - 2).to_bytes(32, "big")
    for private_key in [smallest, largest]:
        assert sm.sm2_public_key_from_private(private_key) == sm._gmssl_public_key(private_key, sm.SM2_CURVE)


def test_sm2_sign_verify_round_trip(keypair):
    signature = sm.sm2_sign(keypair.private_key, b"report 2026Q3")
    assert sm.sm2_verify(keypair.public_key, b"report 2026Q3", signature) is None


def test_sm2_signature_is_canonical_der(keypair):
    signature = sm.sm2_sign(keypair.private_key, b"report 2026Q3")
    r, s = decode_dss_signature(signature)
    n = int(sm.SM2_CURVE["n"], 16)
    assert encode_dss_signature(r, s) == signature
    assert 1 <= r < n
    assert 1 <= s < n


def test_sm2_signatures_are_randomised(keypair):
    first = sm.sm2_sign(keypair.private_key, b"same")
    second = sm.sm2_sign(keypair.private_key, b"same")
    assert first != second


def test_sm2_explicit_default_user_id_accepted(keypair):
    signature = sm.sm2_sign(keypair.private_key, b"m", user_id=bytearray(b"1234567812345678"))
    sm.sm2_verify(keypair.public_key, b"m", signature, user_id=b"1234567812345678")


def test_sm2_sign_rejects_other_user_id(keypair):
    with pytest.raises(sm.CryptoInputInvalid) as caught:
        sm.sm2_sign(keypair.private_key, b"m", user_id=b"inst-001@regsandbox")
    assert_user_facing(caught.value, "sm2_user_id_unsupported")
    assert "inst-001@regsandbox" in caught.value.message
    assert "1234567812345678" in caught.value.message


def test_sm2_verify_rejects_other_user_id(keypair):
    # The gmssl path signs and verifies under another ID, and sm2_verify must reject that ID.
    signature = sm._gmssl_sign(
        keypair.private_key, b"m", b"inst-001@regsandbox", sm.SM2_CURVE, nonce=12345678901234567890
    )
    sm._gmssl_verify(keypair.public_key, b"m", signature, b"inst-001@regsandbox", sm.SM2_CURVE)
    with pytest.raises(sm.CryptoInputInvalid) as caught:
        sm.sm2_verify(keypair.public_key, b"m", signature, user_id=b"inst-001@regsandbox")
    assert_user_facing(caught.value, "sm2_user_id_unsupported")
    with pytest.raises(sm.SignatureInvalid):
        sm.sm2_verify(keypair.public_key, b"m", signature)


def test_sm2_rejects_non_bytes_user_id(keypair):
    with pytest.raises(sm.CryptoInputInvalid) as caught:
        sm.sm2_sign(keypair.private_key, b"m", user_id="1234567812345678")
    assert_user_facing(caught.value, "sm2_user_id_invalid")


def test_sm2_signature_verifies_in_gmssl(keypair):
    signature = sm.sm2_sign(keypair.private_key, b"cross check")
    assert gmssl_engine(keypair.public_key).verify_with_sm3(signature.hex(), b"cross check")


def test_sm2_verifies_gmssl_signature(keypair):
    engine = gmssl_engine(keypair.public_key, keypair.private_key)
    signature = bytes.fromhex(engine.sign_with_sm3(b"cross check", "%064x" % 12345678901234567890))
    sm.sm2_verify(keypair.public_key, b"cross check", signature)


def test_sm2_encrypt_decrypt_round_trip(keypair):
    data_key = sm.generate_sm4_key()
    ciphertext = sm.sm2_encrypt(keypair.public_key, data_key)
    assert len(ciphertext) == 65 + 32 + 16
    assert sm.sm2_decrypt(keypair.private_key, ciphertext) == data_key


def test_sm2_ciphertext_is_c1c3c2_for_gmssl(keypair):
    ciphertext = sm.sm2_encrypt(keypair.public_key, b"data key bytes")
    # gmssl writes C1 without the 04 point-format byte.
    assert gmssl_engine(keypair.public_key, keypair.private_key).decrypt(ciphertext[1:]) == b"data key bytes"


def test_sm2_decrypts_gmssl_c1c3c2(keypair):
    gmssl_ciphertext = gmssl_engine(keypair.public_key).encrypt(b"from gmssl")
    assert sm.sm2_decrypt(keypair.private_key, b"\x04" + gmssl_ciphertext) == b"from gmssl"


# --- SM2 rejected inputs -------------------------------------------------------------------------


def test_sm2_rejects_other_message(keypair):
    signature = sm.sm2_sign(keypair.private_key, b"approved")
    with pytest.raises(sm.SignatureInvalid) as caught:
        sm.sm2_verify(keypair.public_key, b"rejected", signature)
    assert_user_facing(caught.value, "sm2_signature_invalid")


def test_sm2_rejects_other_public_key(keypair):
    signature = sm.sm2_sign(keypair.private_key, b"m")
    with pytest.raises(sm.SignatureInvalid):
        sm.sm2_verify(ANNEX_PUBLIC, b"m", signature)


@pytest.mark.parametrize(
    "signature",
    [
        b"",
        b"\x30\x00",
        encode_dss_signature(0, ANNEX_S),
        encode_dss_signature(ANNEX_R, int(sm.SM2_CURVE["n"], 16)),
        encode_dss_signature(ANNEX_R, ANNEX_S) + b"\x00",
        bytes.fromhex("%064x%064x" % (ANNEX_R, ANNEX_S)),
    ],
    ids=["empty", "empty_sequence", "r_zero", "s_equals_n", "trailing_byte", "raw_r_s"],
)
def test_sm2_rejects_malformed_signature(signature):
    with pytest.raises(sm.SignatureInvalid) as caught:
        sm.sm2_verify(ANNEX_PUBLIC, b"message digest", signature)
    assert_user_facing(caught.value, "sm2_signature_invalid")


def test_sm2_rejects_point_off_curve():
    off_curve = ANNEX_PUBLIC[:-1] + bytes([ANNEX_PUBLIC[-1] ^ 1])
    with pytest.raises(sm.KeyInvalid) as caught:
        sm.sm2_encrypt(off_curve, b"x")
    assert_user_facing(caught.value, "sm2_point_invalid")


def test_sm2_rejects_compressed_public_key():
    with pytest.raises(sm.KeyInvalid) as caught:
        sm.sm2_verify(b"\x02" + ANNEX_PUBLIC[1:33], b"m", b"")
    assert_user_facing(caught.value, "sm2_point_invalid")


@pytest.mark.parametrize("private_key", [bytes(32), bytes.fromhex(sm.SM2_CURVE["n"]), bytes(31) + b"\x01" * 2])
def test_sm2_rejects_private_key_out_of_range(private_key):
    with pytest.raises(sm.KeyInvalid) as caught:
        sm.sm2_sign(private_key, b"m")
    assert_user_facing(caught.value, "sm2_private_key_invalid")


@pytest.mark.parametrize("position", [1, 65, 65 + 32, -1], ids=["c1", "c3", "c2_first", "c2_last"])
def test_sm2_decrypt_rejects_altered_ciphertext(position):
    altered = bytearray(ANNEX_CIPHERTEXT)
    altered[position] ^= 0x01
    with pytest.raises(sm.DecryptionFailed) as caught:
        sm.sm2_decrypt(ANNEX_PRIVATE, bytes(altered))
    assert_user_facing(caught.value, "decryption_failed")


def test_sm2_decrypt_rejects_other_private_key(keypair):
    with pytest.raises(sm.DecryptionFailed):
        sm.sm2_decrypt(keypair.private_key, ANNEX_CIPHERTEXT)


def test_sm2_decrypt_rejects_short_ciphertext():
    with pytest.raises(sm.DecryptionFailed) as caught:
        sm.sm2_decrypt(ANNEX_PRIVATE, ANNEX_CIPHERTEXT[:97])
    assert "97" in caught.value.message


def test_sm2_encrypt_rejects_empty_plaintext():
    with pytest.raises(sm.CryptoInputInvalid) as caught:
        sm.sm2_encrypt(ANNEX_PUBLIC, b"")
    assert_user_facing(caught.value, "sm2_plaintext_empty")
