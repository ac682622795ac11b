"""Proposals for every field of the shipped report templates, from the declarations and from values."""

from __future__ import annotations

import pytest
from faker import Faker

from catalog.classes import CATEGORY_MIN_LEVELS, KINDS, ColumnClass
from catalog.detectors import DEFAULT_CLASSES, propose
from intake.template_model import TemplateCatalog

from .test_detectors import card_number, mobile, resident_id, uscc_code

TEMPLATES = TemplateCatalog.load()


def kind_of(template_code: str, field_code: str) -> str:
    template = TEMPLATES.get(template_code)
    return propose(template, template.field(field_code)).column_class.kind


def test_every_shipped_field_proposed() -> None:
    for template in TEMPLATES.all():
        for item in template.fields:
            proposal = propose(template, item)
            assert isinstance(proposal.column_class, ColumnClass), (template.code, item.code)
            assert 0 < proposal.confidence <= 1, (template.code, item.code)
            assert proposal.evidence, (template.code, item.code)


def test_default_classes_cover_kinds() -> None:
    assert set(DEFAULT_CLASSES) == set(KINDS)
    for kind, (level, category) in DEFAULT_CLASSES.items():
        if category is not None:
            assert level >= CATEGORY_MIN_LEVELS[category], kind
    assert DEFAULT_CLASSES["auth_secret"] == (4, "C3")


@pytest.mark.parametrize(("template_code", "field_code", "kind"), [
    ("EAST_DGKHXXB", "ZJHM", "uscc"),
    ("EAST_DGXDYWJJB", "ZJHM", "uscc"),
    ("EAST_DGKHXXB", "FDDBRZJHM", "resident_id"),
    ("EAST_DBHTB", "DBRZJHM", "resident_id"),
    ("EAST_DGKHXXB", "KHMC", "org_name"),
    ("EAST_DGXDYWJJB", "KHMC", "org_name"),
    ("EAST_XDHTB", "KHMC", "person_name"),
    ("EAST_DGKHXXB", "FDDBRXM", "person_name"),
    ("EAST_DGKHXXB", "CWLXRSJ", "mobile"),
    ("EAST_DGKHXXB", "ZCDZ", "address"),
    ("EAST_DGCKFHZMXJL", "CKZH", "account_no"),
    ("EAST_STZFXXB", "JYDSZH", "account_no"),
    ("EAST_DGXDYWJJB", "JJYE", "amount"),
    ("EAST_DGXDYWJJB", "KHTYBH", "customer_no"),
    ("EAST_DGXDYWJJB", "JRXKZH", "licence_no"),
    ("EAST_DGXDYWJJB", "BEIZ", "free_text"),
    ("EAST_DGXDYWJJB", "WJFL", "other"),
])
def test_key_field_kinds(template_code: str, field_code: str, kind: str) -> None:
    assert kind_of(template_code, field_code) == kind


def test_resident_id_proposal_class() -> None:
    template = TEMPLATES.get("EAST_DGKHXXB")

    proposal = propose(template, template.field("FDDBRZJHM"))

    assert proposal.column_class == ColumnClass(level=4, pi_category="C2", kind="resident_id")
    assert {item.source for item in proposal.evidence} == {"name", "rule_check"}


def test_aggregate_template_not_personal() -> None:
    template = TEMPLATES.get("G01")

    for item in template.fields:
        proposal = propose(template, item)
        assert proposal.column_class.pi_category is None, item.code
        assert proposal.column_class.level <= 2, item.code


def test_values_turn_customer_name_to_org() -> None:
    template = TEMPLATES.get("EAST_XDHTB")
    fake = Faker("zh_CN")
    fake.seed_instance(3)

    proposal = propose(template, template.field("KHMC"), [fake.company() for _ in range(50)])

    assert proposal.column_class.kind == "org_name"
    assert proposal.column_class.pi_category is None
    values = [item for item in proposal.evidence if item.source == "values"]
    assert values[0].matched == 50


def test_values_find_cards_in_account_column() -> None:
    template = TEMPLATES.get("EAST_DGCKFHZMXJL")

    proposal = propose(template, template.field("DFZH"), [card_number(19) for _ in range(60)])

    assert proposal.column_class.kind == "bank_card"
    assert proposal.column_class.level == 4


def test_values_find_resident_ids_in_id_column() -> None:
    template = TEMPLATES.get("EAST_DGKHXXB")

    proposal = propose(template, template.field("ZJHM"), [resident_id() for _ in range(40)])

    assert proposal.column_class.kind == "resident_id"


def test_mixed_id_column_keeps_template_kind() -> None:
    template = TEMPLATES.get("EAST_DBHTB")
    values = [resident_id() for _ in range(25)] + [uscc_code() for _ in range(25)]

    proposal = propose(template, template.field("DBRZJHM"), values)

    assert proposal.column_class.kind == "resident_id"
    assert [item.kind for item in proposal.evidence if item.source == "values"] == ["other"]


def test_checked_mobile_ignores_values() -> None:
    template = TEMPLATES.get("EAST_DGKHXXB")

    proposal = propose(template, template.field("CWLXRSJ"), [mobile() for _ in range(30)])

    assert proposal.column_class.kind == "mobile"
    assert proposal.confidence == pytest.approx(0.99)
