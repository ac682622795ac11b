"""Platform settings, read from ``REGSANDBOX_*`` environment variables.

Every process of the platform builds one :class:`Settings` through :func:`get_settings`.
Defaults describe the embedded single-machine start (``make up``): every service on
127.0.0.1, SQLite and files under the data directory ``var/``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIN_AUDIT_RETENTION_DAYS = 180
MAX_K_ANONYMITY = 1000


class Settings(BaseSettings):
    """Settings shared by all services; each field is one ``REGSANDBOX_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="REGSANDBOX_", extra="ignore")

    data_dir: Path = Field(
        default=PROJECT_ROOT / "var",
        description="Data directory holding databases, extracts, keys, reports and mail. Default: var/ in the checkout.",
    )
    host: str = Field(default="127.0.0.1", description="Address every service listens on.")
    admin_api_port: int = Field(default=8700, description="Port of admin_api and the web console.")
    hub_port: int = Field(default=8701, description="Public port of JupyterHub (configurable-http-proxy).")
    hub_api_port: int = Field(default=8702, description="Port of the JupyterHub REST API behind the proxy.")
    proxy_api_port: int = Field(default=8703, description="Port of the configurable-http-proxy REST API.")
    mlflow_port: int = Field(default=8704, description="Port of the MLflow tracking server.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the admin database. Default: SQLite file <data_dir>/admin.db. "
        "Production: postgresql+psycopg://user@host:5432/regsandbox.",
    )
    smtp_host: str = Field(default="127.0.0.1", description="SMTP relay that receives report emails.")
    smtp_port: int = Field(default=8725, description="Port of the SMTP relay. The embedded sink listens here.")
    smtp_timeout: float = Field(default=10.0, description="Seconds to wait for the SMTP relay before a send fails.")
    smtp_sink: bool = Field(
        default=True,
        description="Start the embedded SMTP sink with `regsandbox up`. Set false when smtp_host is a real relay.",
    )
    mail_from: str = Field(default="regsandbox@localhost", description="Sender address of report emails.")
    scheduler_poll_seconds: float = Field(
        default=3.0, description="Seconds between two polls of the scheduler for on-demand runs and schedule changes."
    )
    hub_user_sync_seconds: float = Field(
        default=15.0, ge=0.5, le=30.0,
        description="Seconds between two rounds of the hub's user sync, which compares JupyterHub's users with admin_api: "
        "it stops the servers and removes the hub accounts of disabled users, stops a server whose user changed "
        "institution or lost the modeller role, and moves hub group membership. At most 30, so that a disabled "
        "user loses the sandbox within 60 s even when one round is slow.",
    )
    registry_sync_seconds: float = Field(
        default=15.0, ge=0.5, le=30.0,
        description="Seconds between two runs of the MLflow permission sync (`python -m model_registry.sync --loop`). "
        "Each run also locks disabled users out of MLflow, so at most 30, which keeps that within 60 s.",
    )
    sandbox_python: Path = Field(
        default=Path(sys.prefix) / "bin" / "python",
        description="Interpreter that sandbox servers and kernels run with. Every sandbox Unix user must be able to execute it.",
    )
    unix_prefix: str = Field(
        default="rs-", description="Prefix of the Unix users and groups created for modellers and institutions."
    )
    sandbox_home_root: Path = Field(
        default=Path("/home"), description="Folder under which sandbox Unix users get their home (mode 0700)."
    )
    mlflow_workers: int = Field(default=1, description="Number of gunicorn/uvicorn workers of the MLflow server.")
    console_public_url: str | None = Field(
        default=None,
        description="Address at which users reach the console through the TLS gateway, e.g. https://console.example. "
        "With https the console's cookies get the Secure attribute. Unset: the console is only reached on host:port.",
    )
    hub_public_url: str | None = Field(
        default=None,
        description="Address at which users reach JupyterHub through the TLS gateway, e.g. https://hub.example. "
        "JupyterHub marks its cookies Secure when it is https.",
    )
    password_min_length: int = Field(
        default=12, ge=8, le=128,
        description="Minimum length of a user password. A password also needs three of four character classes "
        "(upper case, lower case, digit, symbol) and must not contain the user name.",
    )
    password_history_size: int = Field(
        default=5, ge=1, le=24,
        description="Number of a user's latest password hashes kept; a new password must differ from all of them.",
    )
    password_hash_memory_kib: int = Field(
        default=47104, ge=19456, le=4194304,
        description="Memory in KiB of one argon2id password hash. The default with one pass and one lane "
        "(46 MiB, t=1, p=1) is the first of the equivalent settings the OWASP Password Storage Cheat Sheet "
        "lists beside its minimum of 19 MiB with two passes. Counted as memory × passes, it costs about a quarter of "
        "argon2-cffi's default (64 MiB, t=3, p=4), whose four lanes kept "
        "both cores of a 2-core server busy for each sign-in. Raise it together with the iterations on larger "
        "servers. A stored hash with other parameters is rehashed at the user's next successful sign-in.",
    )
    password_hash_iterations: int = Field(
        default=1, ge=1, le=10, description="Passes (time cost) of one argon2id password hash; see the memory setting.",
    )
    password_hash_lanes: int = Field(
        default=1, ge=1, le=16,
        description="Lanes (parallelism) of one argon2id password hash. More lanes finish one hash sooner on idle "
        "cores but take the same CPU time, so on a small server they delay every other request.",
    )
    password_max_age_days: int = Field(
        default=90, ge=0,
        description="Days after which a password expires; the user can then only change it. 0: passwords never expire.",
    )
    sign_in_max_failures: int = Field(
        default=5, ge=1,
        description="Consecutive failed sign-ins of one user after which the account is locked.",
    )
    sign_in_lockout_minutes: list[int] = Field(
        default=[1, 5, 15, 60], min_length=1,
        description="Lockout duration in minutes of the first, second, … lockout since the last successful sign-in; "
        "the last value repeats. JSON list, e.g. [1,5,15,60].",
    )
    totp_required_roles: list[str] = Field(
        default=["system_admin", "security_admin", "audit_admin", "institution_admin", "regulator_reviewer",
                 "regulator_analyst", "data_steward"],
        description="Built-in roles that must sign in with a TOTP code; a user of these roles without one can only "
        "enrol. JSON list of role codes; [] makes the second factor optional for every built-in role. Custom "
        "regulator roles and custom roles holding an administrator capability always require it.",
    )
    console_idle_minutes: int = Field(
        default=30, ge=1, description="Minutes after which an unused console session ends and the user signs in again."
    )
    personal_token_max_days: int = Field(
        default=90, ge=1, le=366, description="Maximum lifetime in days of a personal API token."
    )

    audit_retention_days: int = Field(
        default=180,
        description="Minimum number of days audit events are kept; at least 180 (six months). The platform never "
        "deletes audit events. `regsandbox audit archive` copies the events older than this to a signed file.",
    )
    audit_checkpoint_minutes: int = Field(
        default=10, ge=1,
        description="Minutes between SM2-signed checkpoints of the audit chain head that admin_api writes under "
        "<data_dir>/audit/checkpoints/ while the head moves; `regsandbox audit verify` checks them.",
    )
    task_reminder_minutes: int = Field(
        default=60, ge=1,
        description="Minutes between the runs of admin_api's collection task reminders (报送任务提醒): reporters of "
        "institutions that have not submitted get a system message the configured days before the deadline and once "
        "after it.",
    )
    reidentify_max_per_hour: int = Field(
        default=20, ge=1, le=1000,
        description="Maximum number of successful token re-identifications (令牌反查) per user in any 60 minutes. "
        "A further request is rejected with REIDENTIFY_RATE_LIMITED (HTTP 429) until the oldest one is an hour old.",
    )
    audit_export_max_rows: int = Field(
        default=100_000, ge=1, le=1_000_000,
        description="Maximum number of audit events in one CSV export; narrow the filter to export more.",
    )
    extract_k_anonymity: int = Field(
        default=5,
        description="k of the k-anonymity check of masked extracts: every group of records with equal values in the "
        "quasi-identifier columns that the masking policy declares must have at least k records, or the build is "
        "not published unless a security admin overrides it. 1 turns the check off.",
    )
    extract_feature_min_contributors: int = Field(
        default=5, ge=2, le=1000,
        description="Minimum number of other institutions (k) that a cross-institution feature of an extract "
        "(other lenders, credit and loan balance at other institutions, overdue elsewhere, guarantee circle) must "
        "be built from. A value built from 1 to k-1 other institutions is written as NULL; see extracts/features.py "
        "for what counts as a contributor to each feature. At least 2, since 1 would publish single institutions' values.",
    )

    @field_validator("audit_retention_days", mode="after")
    @classmethod
    def _audit_retention(cls, value: int) -> int:
        if value < MIN_AUDIT_RETENTION_DAYS:
            raise ValueError(
                f"审计日志保留天数 {value} 无效：不能少于 {MIN_AUDIT_RETENTION_DAYS} 天（六个月）。"
                f"请把 REGSANDBOX_AUDIT_RETENTION_DAYS 设为 {MIN_AUDIT_RETENTION_DAYS} 或更大的值。"
            )
        return value

    @field_validator("extract_k_anonymity", mode="after")
    @classmethod
    def _k_anonymity(cls, value: int) -> int:
        if not 1 <= value <= MAX_K_ANONYMITY:
            raise ValueError(
                f"数据提取的 k 匿名参数 {value} 无效：应为 1–{MAX_K_ANONYMITY} 的整数（1 表示不检查）。"
                "请修改 REGSANDBOX_EXTRACT_K_ANONYMITY，常用值为 5。"
            )
        return value

    @field_validator("console_public_url", "hub_public_url", mode="after")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parsed = urlsplit(value.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/") \
                or parsed.query or parsed.fragment:
            raise ValueError(
                f"公开访问地址 {value!r} 无效：应为 https://主机名[:端口] 形式，不带路径，例如 https://console.example。"
            )
        return value.strip().rstrip("/")

    @property
    def console_cookies_secure(self) -> bool:
        """Whether console cookies carry the Secure attribute: only when users reach the console over https."""
        return self.console_public_url is not None and self.console_public_url.startswith("https://")

    @field_validator("data_dir", "sandbox_home_root", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def admin_api_url(self) -> str:
        return f"http://{self.host}:{self.admin_api_port}"

    @property
    def hub_url(self) -> str:
        return f"http://{self.host}:{self.hub_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'admin.db'}"

    # Layout of the data directory. Services create what they own; `regsandbox init` creates all.
    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def extracts_dir(self) -> Path:
        return self.data_dir / "extracts"

    @property
    def warehouse_dir(self) -> Path:
        return self.data_dir / "warehouse"

    @property
    def mlflow_dir(self) -> Path:
        return self.data_dir / "mlflow"

    @property
    def hub_dir(self) -> Path:
        return self.data_dir / "hub"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        """Folder of pid files of the processes that `regsandbox up` started."""
        return self.data_dir / "run"

    @property
    def credentials_file(self) -> Path:
        """Demo credentials, printed once and readable only by the operator (0600)."""
        return self.data_dir / "credentials.txt"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the settings of this process, read once from the environment."""
    return Settings()
