"""Validation of schedule cron expressions for admin_api (parser shared with the scheduler)."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger

from admin_api.errors import invalid
from regsandbox_core.cron import PLATFORM_TIMEZONE
from regsandbox_core.cron import CronExpressionError
from regsandbox_core.cron import parse_cron as _parse_cron
MAX_LENGTH = 200


def parse_cron(expression: str) -> tuple[str, CronTrigger]:
    """Return the expression with single spaces and its trigger, or raise 422 INVALID_CRON."""
    if len(expression) > MAX_LENGTH:
        raise invalid("INVALID_CRON", f"定时表达式共 {len(expression)} 个字符，超过上限 {MAX_LENGTH} 个，请检查是否粘贴了多余内容。")
    try:
        trigger = _parse_cron(expression, PLATFORM_TIMEZONE)
    except CronExpressionError as error:
        raise invalid(error.code, error.message) from error
    return " ".join(expression.split()), trigger
