"""Validation of schedule cron expressions for admin_api (parser shared with the scheduler)."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger

from admin_api.errors import invalid
from regsandbox_core.cron import CronExpressionError
from regsandbox_core.cron import parse_cron as _parse_cron

TIMEZONE = "Asia/Shanghai"


def parse_cron(expression: str) -> tuple[str, CronTrigger]:
    """Return the expression with single spaces and its trigger, or raise 422 INVALID_CRON."""
    try:
        trigger = _parse_cron(expression, TIMEZONE)
    except CronExpressionError as error:
        raise invalid(error.code, error.message) from error
    return " ".join(expression.split()), trigger
