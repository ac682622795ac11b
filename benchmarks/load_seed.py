"""Bulk data of the admin_api load benchmark: institutions, users, messages and audit events.

Institutions, users and messages go in with SQLAlchemy Core inserts in batches. Every bulk user
shares one precomputed argon2id hash of a random password that is thrown away, because hashing
20,000 passwords one after another at the platform's cost (tens of milliseconds of CPU each,
REGSANDBOX_PASSWORD_HASH_*) would take many minutes. The users who sign in during the benchmark
get their own password and their own argon2id hash, so every sign-in runs the real verification.
Those of them whose role must use TOTP (setting ``totp_required_roles``) get a confirmed secret,
stored as admin_api stores it: SM4-GCM under the active platform data key. Audit events are added
through the ORM, so admin_api's own ``before_flush`` listener chains them by SM3 exactly as it
chains live events.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace

import pyotp
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker
from stdnum.cn import uscc as uscc_number

from admin_api import totp
from admin_api.db import utc_now
from admin_api.models import ROLE_NAMES, AuditEvent, Institution, Message, User
from admin_api.passwords import generate_password
from admin_api.security import hash_password
from regsandbox_core.keystore import KIND_DATA, PLATFORM_OWNER, KeyStore
from regsandbox_core.settings import Settings
from regsandbox_core.sm import GCM_NONCE_SIZE, sm4_gcm_encrypt

BATCH_ROWS = 2000
HASH_THREADS = 2
"""Threads that hash passwords at once; argon2-cffi releases the GIL while it hashes."""

# Share of each institution type among the generated institutions, and the legal-form suffix of its names.
INSTITUTION_TYPES = [
    ("银行", 40, "银行股份有限公司"),
    ("保险", 15, "财产保险股份有限公司"),
    ("证券", 10, "证券股份有限公司"),
    ("基金", 8, "基金管理有限公司"),
    ("期货", 4, "期货有限公司"),
    ("信托", 3, "信托有限责任公司"),
    ("地方金融组织", 15, "小额贷款有限公司"),
    ("其他", 5, "金融服务有限公司"),
]
NAME_PREFIXES = ["浦江", "东海", "申城", "陆家嘴", "张江", "金桥", "外滩", "临港", "前滩", "世博", "川沙", "高桥"]
DISTRICTS = ["浦东", "黄浦", "徐汇", "长宁", "静安", "普陀", "虹口", "杨浦", "闵行", "宝山", "嘉定", "松江"]
BRANCH_SHARE = 0.25
"""Share of banks and insurers generated as branches (分支机构) of an earlier legal entity of the same type."""
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
GIVEN_NAMES = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉萍红鹏飞斌宇浩凯晨轩然欣怡婷雪琳"

REGULATOR_USERS = {"system_admin": 40, "security_admin": 10, "audit_admin": 10, "regulator_reviewer": 120}
"""Bulk users without an institution, by role. 40 system administrators is more than a district
regulator has, but the load mix needs that many, for the virtual users and the users arriving
during the load, to sample each administrator call often enough."""
REGULATOR_PREFIXES = {"system_admin": "sysadm", "security_admin": "secadm", "audit_admin": "audadm",
                      "regulator_reviewer": "review", "regulator_analyst": "analys"}
INSTITUTION_PREFIXES = {"modeller": "mod", "reporter": "rep", "institution_admin": "ins"}
INACTIVE_SHARE = 0.03
"""Share of bulk institution users stored as disabled (is_active false); none of them signs in."""
MESSAGES_PER_SIGNED_IN_USER = 40
UNREAD_MESSAGES_PER_SIGNED_IN_USER = 25
AUDIT_ACTIONS = [
    ("auth.token", "success", 60), ("auth.token", "failed", 6), ("console.login", "success", 10),
    ("institutions.update", "success", 6), ("users.update", "success", 6), ("messages.read", "success", 6),
    ("institutions.read", "denied", 3), ("users.list", "denied", 3),
]


@dataclass
class SignInUser:
    """A user who signs in during the benchmark, with the credentials the load client needs."""

    username: str
    password: str
    role: str
    institution_code: str | None
    totp_secret: str | None = None


@dataclass
class SeedSummary:
    """Counts and names of the seeded data, for the load client and the report."""

    institutions: int = 0
    branches: int = 0
    users_by_role: dict[str, int] = field(default_factory=dict)
    inactive_users: int = 0
    messages: int = 0
    audit_events: int = 0
    seconds: float = 0.0
    sign_in_users: list[SignInUser] = field(default_factory=list)
    """The virtual users: they sign in before the load and then call with think time."""
    arriving_users: list[SignInUser] = field(default_factory=list)
    """Users who sign in one by one during the steady window, for the sign-in latency under load."""
    institution_codes: list[str] = field(default_factory=list)
    usernames_by_institution: dict[str, list[str]] = field(default_factory=dict)
    role_by_username: dict[str, str] = field(default_factory=dict)
    active_usernames: set[str] = field(default_factory=set)

    @property
    def users(self) -> int:
        return sum(self.users_by_role.values())


def generated_uscc(index: int) -> str:
    """Return a valid, fictitious 统一社会信用代码 for generated institution ``index``.

    9 = registered by market regulation, 1 = company, 310115 = 浦东新区, then a 9-character
    organisation code ``MB`` + 7 digits (the demo banks use ``MA1K4…``, so the codes never collide),
    and the GB 32100 check character computed by python-stdnum.
    """
    body = f"91310115MB{index:07d}"
    return body + uscc_number.calc_check_digit(body)


def _person_name(rng: random.Random) -> str:
    return rng.choice(SURNAMES) + "".join(rng.choice(GIVEN_NAMES) for _ in range(rng.choice((1, 2))))


def _batches(rows: list[dict], size: int = BATCH_ROWS) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _insert(session: Session, table, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    for batch in _batches(rows):
        session.execute(insert(table), batch)


def _type_plan(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """Return ``count`` (type, name suffix) pairs in the shares of INSTITUTION_TYPES, shuffled."""
    total_weight = sum(weight for _, weight, _ in INSTITUTION_TYPES)
    plan: list[tuple[str, str]] = []
    for kind, weight, suffix in INSTITUTION_TYPES:
        plan += [(kind, suffix)] * round(count * weight / total_weight)
    most_common_kind, _, most_common_suffix = INSTITUTION_TYPES[0]
    while len(plan) < count:
        plan.append((most_common_kind, most_common_suffix))
    plan = plan[:count]
    rng.shuffle(plan)
    return plan


def seed_institutions(session: Session, total: int, rng: random.Random, summary: SeedSummary) -> dict[str, int]:
    """Add generated institutions until ``total`` exist; return {code: id} of all institutions.

    A quarter of the banks and insurers are branches of an earlier legal entity of the same type,
    inserted after all legal entities so that their ``parent_id`` exists.
    """
    existing = session.scalar(select(Institution.id).order_by(Institution.id.desc()).limit(1)) or 0
    existing_count = len(list(session.scalars(select(Institution.id))))
    now = utc_now()
    legal_rows: list[dict] = []
    branch_specs: list[tuple[dict, int]] = []  # (row, index of the parent row in legal_rows)
    legal_by_type: dict[str, list[int]] = {}
    for index, (kind, suffix) in enumerate(_type_plan(total - existing_count, rng), start=1):
        code = f"inst_{index:04d}"
        row = {
            "code": code, "type": kind, "uscc": generated_uscc(index),
            "licence_no": f"B{index:04d}H{231000000 + index}" if kind in ("银行", "保险", "证券", "信托") else None,
            "parent_id": None, "contact_name": _person_name(rng), "contact_phone": f"021-{60000000 + index}",
            "contact_email": f"contact@inst{index:04d}.example", "status": "active", "created_at": now,
            "updated_at": now,
        }
        candidates = legal_by_type.get(kind, [])
        if kind in ("银行", "保险") and candidates and rng.random() < BRANCH_SHARE:
            parent_position = rng.choice(candidates)
            branch_word = "分行" if kind == "银行" else "分公司"
            row["name"] = f"{legal_rows[parent_position]['name']}{rng.choice(DISTRICTS)}第{index:04d}号{branch_word}"
            branch_specs.append((row, parent_position))
            continue
        row["name"] = f"{rng.choice(NAME_PREFIXES)}示范{index:04d}{suffix}"
        legal_by_type.setdefault(kind, []).append(len(legal_rows))
        legal_rows.append(row)
    # Ids are given explicitly, so branch rows can point at their parent without reading ids back.
    for offset, row in enumerate(legal_rows, start=1):
        row["id"] = existing + offset
    for offset, (row, parent_position) in enumerate(branch_specs, start=len(legal_rows) + 1):
        row["id"] = existing + offset
        row["parent_id"] = legal_rows[parent_position]["id"]
    _insert(session, Institution.__table__, legal_rows)
    _insert(session, Institution.__table__, [row for row, _ in branch_specs])
    if session.get_bind().dialect.name == "postgresql":
        # Explicit ids do not advance the serial sequence; later inserts through the API need it past them.
        session.execute(text("SELECT setval(pg_get_serial_sequence('institutions', 'id'), "
                             "(SELECT MAX(id) FROM institutions))"))
    session.flush()
    summary.institutions = len(legal_rows) + len(branch_specs) + existing_count
    summary.branches = len(branch_specs)
    return {code: id_ for code, id_ in session.execute(select(Institution.code, Institution.id))}


def _institution_roles() -> list[tuple[str, float]]:
    """Return the roles of institution users with their shares; 机构管理员 only when admin_api defines it."""
    roles = [("modeller", 0.5), ("reporter", 0.45)]
    if "institution_admin" in ROLE_NAMES:
        roles.append(("institution_admin", 0.05))
    else:
        roles[1] = ("reporter", 0.5)
    return roles


def _regulator_roles() -> dict[str, int]:
    roles = dict(REGULATOR_USERS)
    if "regulator_analyst" in ROLE_NAMES:
        roles["regulator_analyst"] = 60
    return roles


def seed_users(session: Session, settings: Settings, total: int, institution_ids: dict[str, int],
               rng: random.Random, summary: SeedSummary) -> None:
    """Add generated users until ``total`` exist: regulator roles first, the rest spread over the institutions."""
    existing_users = len(list(session.scalars(select(User.id))))
    shared_hash = hash_password(secrets.token_urlsafe(24))
    now = utc_now()
    rows: list[dict] = []

    def add(username: str, role: str, institution_code: str | None, active: bool) -> None:
        rows.append({
            "username": username, "display_name": _person_name(rng), "role": role,
            "email": f"{username}@{(institution_code or 'regulator').replace('_', '-')}.example",
            "institution_id": institution_ids[institution_code] if institution_code else None,
            "password_hash": shared_hash, "is_active": active, "created_at": now, "updated_at": now,
            "password_changed_at": now, "must_change_password": False, "failed_sign_ins": 0, "lockouts": 0,
        })
        summary.users_by_role[role] = summary.users_by_role.get(role, 0) + 1
        summary.role_by_username[username] = role
        if institution_code:
            summary.usernames_by_institution.setdefault(institution_code, []).append(username)
        if active:
            summary.active_usernames.add(username)
        else:
            summary.inactive_users += 1

    for role, count in _regulator_roles().items():
        for number in range(1, count + 1):
            add(f"{REGULATOR_PREFIXES[role]}{number:03d}", role, None, True)

    generated = [code for code in institution_ids if code.startswith("inst_")]
    remaining = total - existing_users - len(rows)
    roles = _institution_roles()
    for position in range(remaining):
        code = generated[position % len(generated)]
        number = position // len(generated) + 1
        role = rng.choices([name for name, _ in roles], weights=[share for _, share in roles])[0]
        add(f"{INSTITUTION_PREFIXES[role]}_{code[5:]}_{number:02d}", role, code, rng.random() >= INACTIVE_SHARE)
    _insert(session, User.__table__, rows)
    session.flush()


def pick_sign_in_users(summary: SeedSummary, mix: dict[str, int], rng: random.Random,
                       exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Return (username, role) of generated users who will sign in, ``mix[role]`` of each role, all active.

    Users in ``exclude`` (picked for another purpose) are not picked again.
    """
    by_role: dict[str, list[str]] = {}
    for username in sorted(summary.active_usernames - exclude):
        by_role.setdefault(summary.role_by_username[username], []).append(username)
    chosen: list[tuple[str, str]] = []
    for role, count in mix.items():
        candidates = by_role.get(role, [])
        if len(candidates) < count:
            raise SystemExit(f"the seed has {len(candidates)} active {role} users, the load mix needs {count}")
        chosen += [(name, role) for name in rng.sample(candidates, count)]
    return chosen


def _hash_all(passwords: list[str]) -> list[str]:
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(hash_password, passwords))


def _sealed_totp_secret(keystore: KeyStore, user_id: int, secret: str) -> tuple[str, int]:
    """Encrypt a TOTP secret as :func:`admin_api.totp.start_enrolment` does; return (Base64, key version)."""
    key = keystore.current(PLATFORM_OWNER, KIND_DATA)
    nonce = secrets.token_bytes(GCM_NONCE_SIZE)
    associated = totp._associated_data(SimpleNamespace(id=user_id), key.version)  # type: ignore[arg-type]
    sealed = sm4_gcm_encrypt(key.key, nonce, secret.encode("ascii"), associated)
    return base64.b64encode(nonce + sealed).decode("ascii"), key.version


def prepare_sign_in_users(session: Session, settings: Settings, keystore: KeyStore, chosen: list[tuple[str, str]],
                          summary: SeedSummary, credentials: dict[str, tuple[str, str]]) -> list[SignInUser]:
    """Give each chosen user its own password and argon2id hash, and TOTP where the role needs it.

    ``credentials`` maps user names to (password, hash) made by an earlier call; users missing from it
    get new ones, which are added to it. So a second backend of the same run reuses the first
    backend's hashes instead of spending another half minute of CPU on them.
    """
    codes = {username: code for code, names in summary.usernames_by_institution.items() for username in names}
    missing = [username for username, _ in chosen if username not in credentials]
    new_passwords = [generate_password(username, settings) for username in missing]
    credentials.update(zip(missing, zip(new_passwords, _hash_all(new_passwords))))
    passwords = [credentials[username][0] for username, _ in chosen]
    hashes = [credentials[username][1] for username, _ in chosen]
    ids = dict(session.execute(select(User.username, User.id).where(User.username.in_([u for u, _ in chosen]))).all())
    now = utc_now()
    users: list[SignInUser] = []
    for (username, role), password, password_hash in zip(chosen, passwords, hashes):
        values: dict = {"password_hash": password_hash, "password_changed_at": now}
        secret = None
        if role in settings.totp_required_roles:
            secret = pyotp.random_base32(32)
            sealed, version = _sealed_totp_secret(keystore, ids[username], secret)
            values.update(totp_secret=sealed, totp_key_version=version, totp_enabled_at=now, totp_last_step=None)
        session.execute(User.__table__.update().where(User.__table__.c.id == ids[username]).values(**values))
        users.append(SignInUser(username, password, role, codes.get(username), secret))
    session.flush()
    return users


def seed_messages(session: Session, users: Iterable[SignInUser]) -> int:
    """Give every signing-in user MESSAGES_PER_SIGNED_IN_USER messages, the newest ones unread."""
    names = [user.username for user in users]
    ids = dict(session.execute(select(User.username, User.id).where(User.username.in_(names))).all())
    now = utc_now()
    rows = []
    for username in names:
        for number in range(MESSAGES_PER_SIGNED_IN_USER):
            created = now - timedelta(hours=MESSAGES_PER_SIGNED_IN_USER - number)
            unread = number >= MESSAGES_PER_SIGNED_IN_USER - UNREAD_MESSAGES_PER_SIGNED_IN_USER
            rows.append({
                "user_id": ids[username], "category": "system" if number % 3 else "model_review",
                "title": f"系统通知第 {number + 1} 号", "body": "基准测试生成的系统消息。", "link": "/console/messages",
                "created_at": created, "read_at": None if unread else created + timedelta(minutes=5), "deleted": False,
            })
    _insert(session, Message.__table__, rows)
    return len(rows)


def seed_audit_events(session_factory: sessionmaker[Session], count: int, role_by_username: dict[str, str],
                      rng: random.Random) -> int:
    """Add ``count`` audit events spread over the last 90 days, chained by admin_api's listener."""
    actions = [(action, outcome) for action, outcome, _ in AUDIT_ACTIONS]
    weights = [weight for _, _, weight in AUDIT_ACTIONS]
    usernames = sorted(role_by_username)
    start = utc_now() - timedelta(days=90)
    step = timedelta(days=90) / max(count, 1)
    added = 0
    while added < count:
        batch = min(BATCH_ROWS * 2, count - added)
        with session_factory() as session:
            events = []
            for offset in range(added, added + batch):
                action, outcome = rng.choices(actions, weights)[0]
                actor = rng.choice(usernames)
                occurred: datetime = start + step * offset
                events.append(AuditEvent(
                    occurred_at=occurred, request_id=secrets.token_hex(16), actor=actor, role=role_by_username[actor],
                    institution_code=_institution_of(actor),
                    source_ip="127.0.0.1", action=action, resource=f"user:{actor}", outcome=outcome,
                    detail=json.dumps({"code": "INVALID_CREDENTIALS"}) if outcome == "failed" else None,
                ))
            session.add_all(events)
            session.commit()
        added += batch
    return added


def _institution_of(username: str) -> str | None:
    """Return the institution code encoded in a generated institution user's name (``mod_0042_03``), else None."""
    parts = username.split("_")
    return f"inst_{parts[1]}" if len(parts) == 3 and parts[0] in INSTITUTION_PREFIXES.values() else None
