"""The period of the demo report files that `regsandbox up` writes: the end of the previous month."""

from __future__ import annotations

import datetime

import pytest

from launcher.cli import sample_period


@pytest.mark.parametrize(("today", "period"), [
    (datetime.date(2026, 12, 5), "20261130"),
    (datetime.date(2026, 1, 1), "20251231"),
    (datetime.date(2028, 3, 31), "20280229"),
])
def test_sample_period_previous_month_end(today: datetime.date, period: str) -> None:
    assert sample_period(today) == period
