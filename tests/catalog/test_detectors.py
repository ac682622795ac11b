"""Value detectors against generated valid and invalid values, and the proposals they support."""

from __future__ import annotations

import random

import pytest
from faker import Faker
from stdnum import luhn
from stdnum.cn import ric, uscc

from catalog.detectors import (
    MIN_SAMPLES,
    VALUE_THRESHOLDS,
    Evidence,
    combine,
    is_address,
    is_bank_card,
    is_mobile,
    is_org_name,
    is_person_name,
    is_resident_id,
    is_uscc,
    scan_values,
    value_evidence,
)

RANDOM = random.Random(20261205)


def resident_id(rng: random.Random = RANDOM) -> str:
    """A resident ID of a Pudong area code and a real birth date, with the GB 11643 check digit from stdnum."""
    body = f"310115{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    return body + ric.calc_check_digit(body + "0")  # stdnum expects a placeholder for the check digit


def wrong_check(number: str, alphabet: str) -> str:
    """Replace the last character of ``number`` by another character of ``alphabet``."""
    return number[:-1] + next(char for char in alphabet if char != number[-1])


def uscc_code(rng: random.Random = RANDOM) -> str:
    body = "91310115" + "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRTUWXY") for _ in range(9))
    return body + uscc.calc_check_digit(body)


def card_number(length: int, rng: random.Random = RANDOM) -> str:
    body = "62" + "".join(rng.choice("0123456789") for _ in range(length - 3))
    return body + luhn.calc_check_digit(body)


def mobile(rng: random.Random = RANDOM) -> str:
    return f"1{rng.choice('3456789')}{rng.randint(0, 999_999_999):09d}"


def test_resident_id_valid_check_digit() -> None:
    samples = [resident_id() for _ in range(200)]

    assert all(is_resident_id(value) for value in samples)


def test_resident_id_wrong_check_digit() -> None:
    samples = [wrong_check(resident_id(), "0123456789X") for _ in range(200)]

    assert not any(is_resident_id(value) for value in samples)


def test_resident_id_bad_birth_date_or_length() -> None:
    impossible = "31011519991332001"  # month 13
    assert not is_resident_id(impossible + ric.calc_check_digit(impossible + "0"))
    assert not is_resident_id(resident_id()[:17])
    assert not is_resident_id("ABCDEFGHIJKLMNOPQR")


def test_resident_id_unknown_area_accepted() -> None:
    body = "99999919800101001"  # area code 999999 is in no table; the check digit is right

    assert is_resident_id(body + ric.calc_check_digit(body + "0"))


def test_uscc_valid_and_wrong_check() -> None:
    valid = [uscc_code() for _ in range(200)]
    wrong = [wrong_check(code, "0123456789ABCDEFGHJKLMNPQRTUWXY") for code in valid]

    assert all(is_uscc(code) for code in valid)
    assert not any(is_uscc(code) for code in wrong)


@pytest.mark.parametrize("length", [13, 16, 19])
def test_bank_card_luhn(length: int) -> None:
    valid = [card_number(length) for _ in range(100)]
    wrong = [wrong_check(number, "0123456789") for number in valid]

    assert all(is_bank_card(number) for number in valid)
    assert not any(is_bank_card(number) for number in wrong)


def test_bank_card_length_limits() -> None:
    assert not is_bank_card(card_number(12 + 1)[:12])
    body = "6" * 19
    assert not is_bank_card(body + luhn.calc_check_digit(body))  # 20 digits


def test_mobile_numbers() -> None:
    assert all(is_mobile(mobile()) for _ in range(200))
    assert is_mobile("+86 13812345678")
    assert not is_mobile("12812345678")  # second digit 2
    assert not is_mobile("1381234567")  # 10 digits
    assert not is_mobile("021-58881234")


def test_person_names_faker() -> None:
    fake = Faker("zh_CN")
    fake.seed_instance(11)
    names = [fake.name() for _ in range(500)]

    share = sum(is_person_name(name) for name in names) / len(names)

    assert share >= VALUE_THRESHOLDS["person_name"]
    assert is_person_name("欧阳娜娜")
    assert not is_person_name("王")  # one character
    assert not is_person_name("王小明明明")  # five characters
    assert not is_person_name("Zhang Wei")
    assert not is_person_name("李记商行")


def test_addresses_and_organisations() -> None:
    fake = Faker("zh_CN")
    fake.seed_instance(12)
    addresses = [fake.address() for _ in range(300)]
    companies = [fake.company() for _ in range(300)]

    assert sum(is_address(value) for value in addresses) / 300 >= VALUE_THRESHOLDS["address"]
    assert sum(is_org_name(value) for value in companies) / 300 >= VALUE_THRESHOLDS["org_name"]
    assert not any(is_person_name(value) for value in companies)
    assert not is_address("上海市")  # no street-level part
    assert not is_address("浦东示范银行甲")


def test_scan_counts_non_empty_only() -> None:
    values = [resident_id() for _ in range(30)] + ["", None, "  "]

    report = scan_values(values)

    assert report.sampled == 30
    assert report.matched["resident_id"] == 30
    assert report.supported() == ["resident_id"]


def test_threshold_below_not_supported() -> None:
    valid = [resident_id() for _ in range(85)]
    wrong = [wrong_check(resident_id(), "0123456789X") for _ in range(15)]

    report = scan_values(valid + wrong)

    assert report.share("resident_id") == pytest.approx(0.85)
    assert "resident_id" not in report.supported()


def test_too_few_samples_not_judged() -> None:
    report = scan_values([mobile() for _ in range(MIN_SAMPLES - 1)])

    evidence = value_evidence(report)

    assert report.supported() == []
    assert [item.kind for item in evidence] == ["other"]
    assert evidence[0].sampled == MIN_SAMPLES - 1


def test_random_digits_not_cards() -> None:
    rng = random.Random(5)
    values = ["".join(rng.choice("0123456789") for _ in range(16)) for _ in range(500)]

    report = scan_values(values)

    assert report.share("bank_card") < 0.2
    assert "bank_card" not in report.supported()


def test_value_evidence_has_counts_not_values() -> None:
    values = [mobile() for _ in range(40)]

    evidence = value_evidence(scan_values(values))

    assert [(item.kind, item.matched, item.sampled) for item in evidence] == [("mobile", 40, 40)]
    text = repr([item.as_dict() for item in evidence])
    assert not any(value in text for value in values)


def test_combine_values_beat_names() -> None:
    evidence = [Evidence("name", "account_no", 0.75, "账号"), Evidence("values", "bank_card", 0.97, "卡号", 97, 100)]

    proposal = combine(evidence)

    assert proposal.column_class.kind == "bank_card"
    assert proposal.column_class.level == 4
    assert proposal.column_class.pi_category == "C2"


def test_combine_format_check_decides() -> None:
    evidence = [Evidence("format_check", "mobile", 0.95, "mobile"), Evidence("values", "person_name", 0.9, "", 9, 10)]

    assert combine(evidence).column_class.kind == "mobile"


def test_combine_agreement_raises_confidence() -> None:
    alone = combine([Evidence("name", "mobile", 0.85, "")])
    agreed = combine([Evidence("name", "mobile", 0.85, ""), Evidence("values", "mobile", 0.85, "", 85, 100)])

    assert agreed.confidence == pytest.approx(alone.confidence + 0.05)


def test_combine_tie_takes_stricter() -> None:
    evidence = [Evidence("rule_check", "uscc", 0.85, ""), Evidence("rule_check", "resident_id", 0.85, "")]

    assert combine(evidence).column_class.kind == "resident_id"


def test_combine_nothing_is_other() -> None:
    proposal = combine([])

    assert proposal.column_class.kind == "other"
    assert proposal.evidence[-1].source == "default"
