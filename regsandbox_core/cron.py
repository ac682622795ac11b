"""Parsing of schedule cron expressions into APScheduler triggers, with crontab's meaning.

admin_api validates schedules and the report scheduler fires them with this one parser, so an
expression means the same in both.
"""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger

from regsandbox_core.errors import RegsandboxError

PLATFORM_TIMEZONE = "Asia/Shanghai"
"""Time zone in which schedules are read and the console shows times (北京时间)."""

# Crontab numbers weekdays from 0 = Sunday (7 is Sunday too); APScheduler 3.x counts 0 = Monday.
# Numeric weekday fields are therefore rewritten as lists of names, which both read the same way.
_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


class CronExpressionError(RegsandboxError):
    """A schedule's cron expression is invalid (code ``INVALID_CRON``, HTTP 422)."""

    status = 422


def _invalid(expression: str, reason: str) -> CronExpressionError:
    return CronExpressionError(
        "INVALID_CRON",
        f"定时表达式 {expression!r} 无效（{reason}）。请使用 5 段 crontab（分 时 日 月 周，例如 \"0 8 * * 1-5\"）"
        "或以秒开头的 6 段表达式（例如 \"*/30 * * * * *\"）。",
    )


def _weekday_part(part: str) -> str:
    range_part, _, step_text = part.partition("/")
    step = int(step_text) if step_text else 1
    if range_part == "*":
        if not step_text:
            return "*"
        start, end = 0, 6
    elif range_part.replace("-", "").isdigit():
        bounds = [int(value) for value in range_part.split("-")]
        start, end = bounds[0], bounds[-1]
        if step_text and len(bounds) == 1:
            end = 6
    else:
        return part
    if not (0 <= start <= 7 and 0 <= end <= 7 and start <= end and step >= 1):
        raise ValueError(f"weekday {part!r} out of range 0-7")
    return ",".join(dict.fromkeys(_WEEKDAY_NAMES[day] for day in range(start, end + 1, step)))


def crontab_weekdays(field: str) -> str:
    """Rewrite a crontab day-of-week field (0 or 7 = Sunday) in APScheduler's weekday names."""
    return ",".join(_weekday_part(part) for part in field.split(","))


def parse_cron(expression: str, timezone: str) -> CronTrigger:
    """Return the trigger of a 5-field crontab expression or a 6-field one with leading seconds."""
    fields = expression.split()
    if len(fields) == 5:
        second, (minute, hour, day, month, weekday) = "0", fields
    elif len(fields) == 6:
        second, minute, hour, day, month, weekday = fields
    else:
        raise _invalid(expression, f"共 {len(fields)} 段，应为 5 段或 6 段")
    try:
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month,
            day_of_week=crontab_weekdays(weekday), timezone=timezone,
        )
    except ValueError as error:
        raise _invalid(expression, str(error)) from error
