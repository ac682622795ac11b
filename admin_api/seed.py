"""Demo data: three banks, their modellers and reporters, a reviewer, the three administrators, report notebooks.

:func:`seed_demo` is idempotent: it creates only what is missing and returns the passwords of the
users it created in this call (an empty dict when nothing was created).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from stdnum.cn import uscc as uscc_number

from admin_api.models import Institution, ReportNotebook, User
from admin_api.passwords import generate_password, set_password
from regsandbox_core.settings import PROJECT_ROOT, Settings

logger = logging.getLogger(__name__)

REPORT_NOTEBOOKS_DIR = Path("notebooks") / "reports"

DEMO_INSTITUTIONS = [
    ("bank_a", "浦东示范银行甲", "银行"),
    ("bank_b", "浦东示范银行乙", "银行"),
    ("bank_c", "浦东示范银行丙", "银行"),
]

# Fictitious USCC bodies (9 = registered by market regulation, 1 = company, 310115 = 浦东新区);
# the 18th character is the check character computed by python-stdnum, so the codes validate.
_DEMO_USCC_BODIES = {"bank_a": "91310115MA1K4A001", "bank_b": "91310115MA1K4B002", "bank_c": "91310115MA1K4C003"}

# Fictitious 金融许可证号 in the issued layout (type letter, 4 digits, level letter, 9 digits). Report
# intake checks the institution field of every uploaded row against it.
DEMO_LICENCES = {"bank_a": "B9001H231000001", "bank_b": "B9002H231000002", "bank_c": "B9003H231000003"}


def demo_uscc(code: str) -> str:
    """Return the valid, fictitious 统一社会信用代码 of the demo institution ``code``."""
    body = _DEMO_USCC_BODIES[code]
    return body + uscc_number.calc_check_digit(body)

# (username, display name, role, institution code or None, email)
DEMO_USERS = [
    ("modeller_a", "李明（甲行建模）", "modeller", "bank_a", "modeller_a@bank-a.example"),
    ("modeller_b", "王芳（乙行建模）", "modeller", "bank_b", "modeller_b@bank-b.example"),
    ("modeller_c", "张伟（丙行建模）", "modeller", "bank_c", "modeller_c@bank-c.example"),
    ("reporter_a", "刘洋（甲行报送）", "reporter", "bank_a", "reporter_a@bank-a.example"),
    ("reporter_b", "陈静（乙行报送）", "reporter", "bank_b", "reporter_b@bank-b.example"),
    ("reporter_c", "杨磊（丙行报送）", "reporter", "bank_c", "reporter_c@bank-c.example"),
    ("instadmin_a", "郑华（甲行机构管理员）", "institution_admin", "bank_a", "instadmin_a@bank-a.example"),
    ("reviewer", "赵敏（监管审查员）", "regulator_reviewer", None, "reviewer@regulator.example"),
    ("analyst", "钱进（监管分析员）", "regulator_analyst", None, "analyst@regulator.example"),
    ("sysadmin", "周强（系统管理员）", "system_admin", None, "sysadmin@regulator.example"),
    ("secadmin", "吴刚（安全管理员）", "security_admin", None, "secadmin@regulator.example"),
    ("auditor", "孙丽（审计管理员）", "audit_admin", None, "auditor@regulator.example"),
    ("steward", "冯雪（数据治理专员）", "data_steward", None, "steward@regulator.example"),
]


def _notebook_title(path: Path) -> str:
    """Return metadata.regsandbox.title of a notebook, else the file stem."""
    try:
        metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
        title = metadata.get("regsandbox", {}).get("title")
    except (OSError, ValueError, AttributeError) as error:
        logger.warning("cannot read the title of %s: %s", path, error)
        title = None
    return title.strip() if isinstance(title, str) and title.strip() else path.stem


def register_report_notebooks(session: Session, project_root: Path = PROJECT_ROOT) -> list[ReportNotebook]:
    """Register every notebooks/reports/*.ipynb not yet known, with status pending; the caller commits."""
    known = set(session.scalars(select(ReportNotebook.path)))
    created = []
    for path in sorted((project_root / REPORT_NOTEBOOKS_DIR).glob("*.ipynb")):
        relative = path.relative_to(project_root).as_posix()
        if relative in known:
            continue
        notebook = ReportNotebook(name=_notebook_title(path), path=relative, status="pending")
        session.add(notebook)
        created.append(notebook)
        logger.info("registered report notebook %s", relative)
    return created


def seed_demo(session: Session, settings: Settings, project_root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Create the missing demo institutions, users and report notebooks and commit.

    Returns {username: password} of the users created in this call; the passwords satisfy the
    password policy of ``settings`` and need no change at the first sign-in.
    """
    institutions = {i.code: i for i in session.scalars(select(Institution))}
    for code, name, kind in DEMO_INSTITUTIONS:
        if code not in institutions:
            institutions[code] = Institution(code=code, name=name, type=kind, uscc=demo_uscc(code),
                                             licence_no=DEMO_LICENCES[code])
            session.add(institutions[code])
        else:  # stored before the registry had these columns
            institutions[code].uscc = institutions[code].uscc or demo_uscc(code)
            institutions[code].licence_no = institutions[code].licence_no or DEMO_LICENCES[code]
    session.flush()

    existing = set(session.scalars(select(User.username)))
    passwords: dict[str, str] = {}
    for username, display_name, role, code, email in DEMO_USERS:
        if username in existing:
            continue
        password = generate_password(username, settings)
        user = User(
            username=username, display_name=display_name, email=email, role=role,
            institution_id=institutions[code].id if code else None, password_hash="", is_active=True,
        )
        session.add(user)
        session.flush()
        set_password(session, user, password, settings, must_change=False)
        passwords[username] = password

    register_report_notebooks(session, project_root)
    session.commit()
    logger.info("demo seed created %d users in %s", len(passwords), settings.sqlalchemy_url.split("@")[-1])
    return passwords
