"""Passwords, bearer tokens, console sessions and the role → capability table.

Every route names one capability, and :data:`CAPABILITIES` lists the roles that have it. The service
role is what callers get with the platform service token (hub, scheduler, registry sync).
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from admin_api.db import utc_now
from admin_api.models import ApiToken, Institution, User
from regsandbox_core.crypto import constant_time_equal, hmac_sm3, sm3_hex
from regsandbox_core.settings import Settings, get_settings

API_TOKEN_LIFETIME = timedelta(hours=8)
CONSOLE_SESSION_LIFETIME = timedelta(hours=8)
LAST_SEEN_INTERVAL = timedelta(minutes=1)
"""Console sessions record their last use at most this often, to spare a database write per page."""
SERVICE_NAMES = frozenset({"hub", "scheduler", "registry"})
ANONYMOUS = "anonymous"
SERVICE = "service"

_hasher: PasswordHasher | None = None
"""argon2id hasher with the cost of the settings (REGSANDBOX_PASSWORD_HASH_*); see configure_password_hashing."""
_dummy_hash = ""
"""Hash of a random password with the same cost, checked for unknown user names so they take as long."""


@dataclass(frozen=True)
class Principal:
    """The caller of a request as the authorisation dependency resolved it."""

    kind: str
    """``anonymous``, ``service`` or ``user``."""
    username: str
    role: str
    institution_code: str | None = None
    scopes: frozenset[str] | None = None
    """Capabilities of a personal API token; None for sign-in tokens and sessions, which have every capability of the role."""
    user_id: int | None = field(default=None, compare=False)
    """Database id of a user resolved from a token or session, so routes need not look it up again; None otherwise."""


ANONYMOUS_PRINCIPAL = Principal(kind=ANONYMOUS, username=ANONYMOUS, role=ANONYMOUS)

_USERS = frozenset({"system_admin", "regulator_reviewer", "regulator_analyst", "institution_admin", "modeller", "reporter",
                    "security_admin", "audit_admin", "data_steward"})
_REGULATORS = frozenset({"regulator_reviewer", "regulator_analyst"})

CAPABILITIES: dict[str, tuple[str, frozenset[str]]] = {
    # capability: (Chinese name shown in denials, roles holding it)
    "public": ("公开访问", frozenset({ANONYMOUS, SERVICE}) | _USERS),
    "auth.verify": ("代为核验用户登录", frozenset({SERVICE})),
    "me.read": ("查看本人信息", _USERS),
    # institution administrators list and manage the users of their own institution only (admin_api.users)
    "users.list": ("查看用户列表", frozenset({"system_admin", "institution_admin", SERVICE})),
    "users.write": ("管理用户账号", frozenset({"system_admin", "institution_admin"})),
    "roles.read": ("查看角色与权限", frozenset({"system_admin", "security_admin", "audit_admin"})),
    "roles.write": ("新建、修改或删除自定义角色", frozenset({"system_admin"})),
    "me.tokens": ("管理本人的个人访问令牌", _USERS),
    "institutions.read": ("查看机构信息", _USERS | {SERVICE}),
    "institutions.write": ("新建、修改、停用或导入机构", frozenset({"system_admin"})),
    "audit.append": ("写入审计事件", frozenset({SERVICE})),
    # Three separate administrators: the system administrator runs the platform, the security
    # administrator manages keys, and only the audit administrator reads the audit log.
    "audit.read": ("查看审计日志", frozenset({"audit_admin"})),
    "keys.read": ("查看密钥信息", frozenset({"security_admin", "audit_admin"})),
    "keys.operate": ("管理密钥", frozenset({"security_admin"})),
    # modellers read the versions of their own institution only (services.visible_models)
    "models.read": ("查看模型版本", _REGULATORS | {"modeller", SERVICE}),
    "models.review": ("审查模型版本", frozenset({"regulator_reviewer"})),
    "notebooks.read": ("查看报告笔记本", _REGULATORS | {"system_admin", SERVICE}),
    "notebooks.approve": ("审批报告笔记本", frozenset({"regulator_reviewer"})),
    "schedules.read": ("查看报告调度", _REGULATORS | {"system_admin", SERVICE}),
    "schedules.write": ("创建或修改报告调度", frozenset({"system_admin"})),
    "runs.queue": ("发起报告运行", frozenset({"system_admin", "regulator_reviewer", SERVICE})),
    "runs.read": ("查看报告运行记录", _REGULATORS | {"system_admin", SERVICE}),
    "runs.work": ("领取或完成报告运行", frozenset({SERVICE})),
    "console.use": ("使用管理控制台", _USERS),
    # security administrators read endpoint settings (never credentials) to see which key version protects them
    "api_endpoints.read": ("查看接口参数配置", frozenset({"system_admin", "security_admin"})),
    "api_endpoints.write": ("管理接口参数配置", frozenset({"system_admin"})),
    "messages.own": ("查看和处理本人系统消息", _USERS),
    # Report intake (报表报送): institution users see their own institution's submissions only (admin_api.submissions).
    "submissions.submit": ("报送报表", frozenset({"reporter", "institution_admin"})),
    "submissions.read": ("查看报表报送记录", _REGULATORS | {"reporter", "institution_admin"}),
    "submissions.review": ("审核报表", frozenset({"regulator_reviewer"})),
    # Collection tasks (报送任务): institution users see the tasks that target their own institution only (admin_api.tasks).
    "tasks.write": ("发布或关闭报送任务", frozenset({"system_admin", "regulator_reviewer"})),
    "tasks.read": ("查看报送任务", _REGULATORS | {"system_admin", "reporter", "institution_admin"}),
    # On-time and acceptance rates compare institutions, so no institution role has this (admin_api.task_statistics).
    "tasks.statistics": ("查看报送统计", _REGULATORS | {"system_admin"}),
    # Report application (报表应用): institution users query their own institution's accepted data only (admin_api.report_data).
    "report_data.read": ("查询和导出已审核通过的报表数据", _REGULATORS | {"reporter", "institution_admin"}),
    # Report templates (报表模板): whoever submits, reads or reviews reports reads them. Only the system administrator writes them.
    "templates.read": ("查看报表模板", _REGULATORS | {"system_admin", "reporter", "institution_admin"}),
    "templates.write": ("上传或删除报表模板版本", frozenset({"system_admin"})),
    # Data catalog (数据目录, 数据分级分类): only the data steward (数据治理专员) confirms or changes classes (admin_api.data_catalog).
    "catalog.read": ("查看数据目录与分级分类", _REGULATORS | {"data_steward"}),
    "catalog.classify": ("确认或变更数据分级分类", frozenset({"data_steward"})),
    # Masked extracts (数据提取): institution users read the build metadata of their own institution only
    # (admin_api.extract_builds); metadata contains no data values. The steward reads it to follow the rebuilds
    # that a class change starts. Rebuilding is an operation of the system administrator, and of the
    # security administrator, who rebuilds after approving a policy or rotating a key.
    "extracts.read": ("查看数据提取的构建信息", _REGULATORS | {"system_admin", "security_admin", "data_steward",
                                                   "institution_admin", "modeller"}),
    "extracts.build": ("重新生成数据提取", frozenset({"system_admin", "security_admin"})),
    # Publishing an extract that the k-anonymity check refused is a security decision: the security
    # administrator only, with a reason, audited as extracts.override_k (admin_api.extract_builds.override_k).
    "extracts.override_k": ("强制发布未达到 k 匿名要求的数据提取", frozenset({"security_admin"})),
    # Masking policies (脱敏策略): the steward or a security administrator uploads a version; another
    # security administrator approves it (four-eyes, admin_api.masking_policies).
    "policies.read": ("查看脱敏策略", frozenset({"security_admin", "data_steward", "audit_admin"})),
    "policies.draft": ("上传脱敏策略草稿", frozenset({"security_admin", "data_steward"})),
    "policies.approve": ("审批或驳回脱敏策略", frozenset({"security_admin"})),
    # Re-identification (令牌反查) reveals the raw personal value behind a token of an extract. Only the
    # reviewer role has it, because reviewers decide on cases while analysts work with masked and aggregated data.
    "tokens.reidentify": ("按案件反查令牌对应的原始值", frozenset({"regulator_reviewer"})),
    # Data quality (数据质量): institution users see their own institution's metrics only (admin_api.data_quality).
    "quality.read": ("查看数据质量指标", _REGULATORS | {"data_steward", "reporter", "institution_admin"}),
}


def allows(role: str, capability: str) -> bool:
    """Return whether ``role`` has ``capability``. An unknown capability is denied to every role.

    Built-in roles are looked up in :data:`CAPABILITIES`; custom roles in :mod:`admin_api.roles`.
    """
    entry = CAPABILITIES.get(capability)
    if entry is None:
        return False
    if role in entry[1]:
        return True
    from admin_api.roles import role_allows  # admin_api.roles imports this module

    return role_allows(role, capability)


ONE_TIME_PREFIX = "$sm3-onetime$"


def configure_password_hashing(settings: Settings) -> None:
    """Use the argon2id cost of ``settings`` for new hashes; admin_api calls this at start-up."""
    global _hasher, _dummy_hash
    cost = (settings.password_hash_iterations, settings.password_hash_memory_kib, settings.password_hash_lanes)
    if _hasher is not None and (_hasher.time_cost, _hasher.memory_cost, _hasher.parallelism) == cost:
        return
    hasher = PasswordHasher(time_cost=cost[0], memory_cost=cost[1], parallelism=cost[2])
    _dummy_hash = hasher.hash(secrets.token_urlsafe(16))
    _hasher = hasher


def _password_hasher() -> PasswordHasher:
    if _hasher is None:
        configure_password_hashing(get_settings())
    assert _hasher is not None
    return _hasher


def hash_password(password: str) -> str:
    return _password_hasher().hash(password)


def password_needs_rehash(password_hash: str) -> bool:
    """Return whether an argon2id hash was made with another cost than the configured one (one-time hashes never)."""
    if password_hash.startswith(ONE_TIME_PREFIX):
        return False
    try:
        return _password_hasher().check_needs_rehash(password_hash)
    except InvalidHashError:
        return False


def hash_one_time_password(password: str) -> str:
    """Return ``$sm3-onetime$<salt hex>$<SM3(salt || password) hex>`` for a password the platform generated.

    Generated passwords carry about 120 bits of randomness (see generate_password), so guessing one
    from a fast salted digest is as infeasible as from argon2id, which exists to slow guesses of
    human-chosen passwords. Users must replace a one-time password at the next sign-in, and the
    replacement is hashed with argon2id. This lets a bulk import of 1,000 users skip 1,000 argon2
    hashes (about 0.15 s each on a 2-core machine).
    """
    salt = secrets.token_bytes(16)
    return f"{ONE_TIME_PREFIX}{salt.hex()}${sm3_hex(salt + password.encode('utf-8'))}"


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check ``password`` against an argon2id or one-time hash; with no hash, spend the same time and fail."""
    if password_hash and password_hash.startswith(ONE_TIME_PREFIX):
        salt_hex, _, digest = password_hash[len(ONE_TIME_PREFIX):].partition("$")
        try:
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            return False
        return constant_time_equal(sm3_hex(salt + password.encode("utf-8")), digest)
    try:
        hasher = _password_hasher()
        return hasher.verify(password_hash or _dummy_hash, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


PASSWORD_SYMBOLS = "-_.@%+=!#"
"""Symbols of generated passwords: none needs quoting in a shell or a URL query."""


def generate_password(length: int = 20) -> str:
    """Return a random password of ``length`` characters with an upper and a lower case letter, a digit and a symbol.

    Each character comes from 71 symbols, so 20 characters carry about 120 bits.
    """
    alphabet = string.ascii_letters + string.digits + PASSWORD_SYMBOLS
    picked = [secrets.choice(string.ascii_uppercase), secrets.choice(string.ascii_lowercase),
              secrets.choice(string.digits), secrets.choice(PASSWORD_SYMBOLS)]
    picked += [secrets.choice(alphabet) for _ in range(length - len(picked))]
    secrets.SystemRandom().shuffle(picked)
    return "".join(picked)


def token_digest(token: str) -> str:
    return sm3_hex(token.encode("utf-8"))


def issue_token(session: Session, user: User, kind: str, lifetime: timedelta) -> tuple[str, datetime]:
    """Store a new token of ``kind`` for ``user``, drop the user's expired ones, and return it with its expiry.

    The caller commits.
    """
    now = utc_now()
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.expires_at < now))
    token = secrets.token_urlsafe(32)
    expires_at = now + lifetime
    session.add(ApiToken(token_sm3=token_digest(token), kind=kind, user_id=user.id, expires_at=expires_at))
    return token, expires_at


@dataclass(frozen=True)
class TokenHolder:
    """User fields of a valid token or console session, read in one query without ORM objects."""

    token_id: int
    user_id: int
    username: str
    role: str
    institution_code: str | None
    is_active: bool
    scopes: list[str] | None


def find_token(session: Session, token: str, kind: str, *, idle_timeout: timedelta | None = None) -> TokenHolder | None:
    """Return the holder of the unexpired, unrevoked token of ``kind`` matching ``token``, or None.

    With ``idle_timeout`` (console sessions), a token unused for that long is also None. A used
    token's ``last_seen_at`` is written and committed at most once per LAST_SEEN_INTERVAL, so the
    personal token page can show when a token was last used. Every authenticated request calls this,
    so it selects the needed columns of the token, its user and the user's institution in one
    statement instead of loading the three ORM objects.
    """
    row = session.execute(
        select(ApiToken.id, ApiToken.expires_at, ApiToken.revoked_at, ApiToken.created_at, ApiToken.last_seen_at,
               ApiToken.scopes, User.id, User.username, User.role, User.is_active, Institution.code)
        .join(User, User.id == ApiToken.user_id)
        .outerjoin(Institution, Institution.id == User.institution_id)
        .where(ApiToken.token_sm3 == token_digest(token), ApiToken.kind == kind)
    ).first()
    now = utc_now()
    if row is None:
        return None
    token_id, expires_at, revoked_at, created_at, last_seen_at, scopes, user_id, username, role, active, code = row
    if revoked_at is not None or expires_at <= now:
        return None
    last_seen = last_seen_at or created_at
    if idle_timeout is not None and now - last_seen >= idle_timeout:
        return None
    if last_seen_at is None or now - last_seen >= LAST_SEEN_INTERVAL:
        session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_seen_at=now))
        session.commit()
    return TokenHolder(token_id=token_id, user_id=user_id, username=username, role=role, institution_code=code,
                       is_active=active, scopes=scopes)


def csrf_token(session_secret: str, session_token: str) -> str:
    """Return the CSRF token of a console session, derived so that it needs no storage."""
    return hmac_sm3(session_secret.encode("utf-8"), f"csrf:{session_token}".encode("utf-8")).hex()
