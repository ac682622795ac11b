"""Column classes and the fail-closed rule for columns no steward has confirmed."""

from __future__ import annotations

import pytest

from catalog.classes import UNCONFIRMED_LEVEL, ColumnClass, effective_class


def test_confirmed_class_applies_as_is() -> None:
    confirmed = ColumnClass(level=2, pi_category="C1", kind="amount")

    assert effective_class(ColumnClass(level=4, pi_category="C2", kind="mobile"), confirmed) == confirmed


def test_unconfirmed_proposal_raised_to_level_four() -> None:
    proposed = ColumnClass(level=2, pi_category="C2", kind="mobile")

    assert effective_class(proposed, None) == ColumnClass(level=UNCONFIRMED_LEVEL, pi_category="C2", kind="mobile")


def test_unconfirmed_higher_proposal_kept() -> None:
    proposed = ColumnClass(level=5, pi_category="C3", kind="auth_secret")

    assert effective_class(proposed, None) == proposed


def test_no_proposal_is_level_four_other() -> None:
    assert effective_class(None, None) == ColumnClass(level=4, pi_category=None, kind="other")


@pytest.mark.parametrize(("level", "category", "kind"), [(0, None, "other"), (6, None, "other"),
                                                         (3, "C4", "other"), (3, None, "passport")])
def test_invalid_class_rejected(level: int, category: str | None, kind: str) -> None:
    with pytest.raises(ValueError):
        ColumnClass(level=level, pi_category=category, kind=kind)  # type: ignore[arg-type]
