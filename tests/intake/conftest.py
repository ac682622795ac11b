"""Fixtures shared by the intake tests: the shipped template catalog and its 对公信贷业务借据表."""

from __future__ import annotations

import pytest

from intake.template_model import Template, TemplateCatalog


@pytest.fixture(scope="module")
def catalog() -> TemplateCatalog:
    return TemplateCatalog.load()


@pytest.fixture(scope="module")
def loan(catalog: TemplateCatalog) -> Template:
    return catalog.get("EAST_DGXDYWJJB")
