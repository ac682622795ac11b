"""Settings of report runs that the shared :class:`~regsandbox_core.settings.Settings` does not hold."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from regsandbox_core.cron import PLATFORM_TIMEZONE


class ReportSettings(BaseSettings):
    """Report execution settings, each one ``REGSANDBOX_REPORT_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="REGSANDBOX_REPORT_", extra="ignore")

    kernel: str = Field(default="python3", description="Jupyter kernel that executes report notebooks.")
    cell_timeout: float = Field(
        default=600.0, gt=0, description="Seconds one notebook cell may run before the run fails."
    )
    start_timeout: float = Field(default=60.0, gt=0, description="Seconds to wait for the kernel to start.")
    timezone: str = Field(
        default=PLATFORM_TIMEZONE,
        description="Time zone of cron expressions and of the report date passed to notebooks. "
        "The console labels schedules in Asia/Shanghai (北京时间), so change it only together with the console.",
    )
