"""Real Unix users and groups: only the institution's group can read its extract.

Runs as root: creates groups and users named ``rst-*`` and deletes them afterwards.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from extracts.builder import build_extract
from extracts.warehouse import warehouse_partition_file
from regsandbox_core.settings import Settings
from tests.extract_setup import approve_shipped_policy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The interpreter of the running tests (the project's virtual environment), with this checkout's
# packages first on the path, so the sandbox user runs the code under test.
VENV_PYTHON = Path(sys.executable)
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


@dataclass(frozen=True)
class UnixFixture:
    member: str
    """User in the group that may read bank_a's extract."""
    outsider: str
    """User in another group (the one of bank_b)."""
    bank_a_group: str
    bank_b_group: str


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


@pytest.fixture
def unix_accounts() -> Iterator[UnixFixture]:
    assert os.geteuid() == 0, "this test creates Unix users and must run as root"
    suffix = secrets.token_hex(3)
    accounts = UnixFixture(
        member=f"rst-m{suffix}",
        outsider=f"rst-u{suffix}",
        bank_a_group=f"rst-x{suffix}",
        bank_b_group=f"rst-y{suffix}",
    )
    created_users: list[str] = []
    created_groups: list[str] = []
    try:
        for group in (accounts.bank_a_group, accounts.bank_b_group):
            _run("groupadd", group)
            created_groups.append(group)
        _run("useradd", "-M", "-N", "-g", accounts.bank_a_group, "-s", "/usr/sbin/nologin", accounts.member)
        created_users.append(accounts.member)
        _run("useradd", "-M", "-N", "-g", accounts.bank_b_group, "-s", "/usr/sbin/nologin", accounts.outsider)
        created_users.append(accounts.outsider)
        yield accounts
    finally:
        for user in created_users:
            subprocess.run(["userdel", user], capture_output=True, timeout=30)
        for group in created_groups:
            subprocess.run(["groupdel", group], capture_output=True, timeout=30)


@pytest.fixture
def traversable_settings(demo_settings: Settings) -> Iterator[Settings]:
    """A data dir under /tmp with mode 0711, the demo warehouse and its key store (pytest's own temp dirs are 0700, so other users cannot pass)."""
    data_dir = Path(tempfile.mkdtemp(prefix="rst-extracts-", dir="/tmp"))
    os.chmod(data_dir, 0o711)
    try:
        # The partitions are encrypted under demo_settings' data keys, so its key store and master key come along.
        for folder in (demo_settings.warehouse_dir, demo_settings.keys_dir, demo_settings.secrets_dir):
            shutil.copytree(folder, data_dir / folder.name)
        settings = Settings(data_dir=data_dir)
        approve_shipped_policy(settings)
        yield settings
    finally:
        shutil.rmtree(data_dir)


def _run_as(user: str, code: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RUNUSER, "-u", user, "--", str(VENV_PYTHON), "-c", code],
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": f"{PROJECT_ROOT}:{PROJECT_ROOT / 'kernels'}",
             **environment},
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_group_modes_and_owner(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    folder = build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    group_id = grp.getgrnam(unix_accounts.bank_a_group).gr_gid

    assert stat.S_IMODE(traversable_settings.extracts_dir.stat().st_mode) == 0o711
    info = folder.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o750, 0, group_id)
    for path in folder.iterdir():
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, group_id), path.name


def test_outsider_cannot_open_extract(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    folder = build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    assert pwd.getpwnam(unix_accounts.outsider).pw_gid != grp.getgrnam(unix_accounts.bank_a_group).gr_gid

    result = _run_as(unix_accounts.outsider, f"open({str(folder / 'applications.parquet')!r}, 'rb')")
    assert result.returncode != 0
    assert "PermissionError" in result.stderr


def test_member_reads_own_extract(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    folder = build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    code = (
        "import regsandbox_kernel as rs\n"
        "print(rs.table('applications').height)\n"
        "print(rs.sql('SELECT count(DISTINCT id_number) AS n FROM applications')['n'][0])\n"
    )
    result = _run_as(
        unix_accounts.member, code, REGSANDBOX_EXTRACT_DIR=str(folder), REGSANDBOX_INSTITUTION="bank_a"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["334", str(_distinct_persons(folder))]


def _distinct_persons(folder: Path) -> int:
    import polars as pl

    return pl.read_parquet(folder / "applications.parquet")["id_number"].n_unique()


def test_member_denied_other_institution(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    own = build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    other = build_extract(traversable_settings, "bank_b", unix_group=unix_accounts.bank_b_group)

    plain_open = _run_as(unix_accounts.member, f"open({str(other / 'applications.parquet')!r}, 'rb')")
    assert plain_open.returncode != 0
    assert "PermissionError" in plain_open.stderr

    listing = _run_as(unix_accounts.member, f"import os; os.listdir({str(traversable_settings.extracts_dir)!r})")
    assert listing.returncode != 0
    assert "PermissionError" in listing.stderr

    through_helper = _run_as(
        unix_accounts.member,
        "import regsandbox_kernel as rs\n"
        "try:\n"
        f"    rs.sql(\"SELECT * FROM read_parquet('{other / 'applications.parquet'}')\")\n"
        "except rs.SandboxAccessError as error:\n"
        "    print(error.code, error.path)\n",
        REGSANDBOX_EXTRACT_DIR=str(own),
    )
    assert through_helper.returncode == 0, through_helper.stderr
    assert through_helper.stdout.split() == ["SANDBOX_ACCESS_DENIED", str(other / "applications.parquet")]


def test_warehouse_unreadable_by_member(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    part = warehouse_partition_file(traversable_settings, "bank_a")
    assert part.is_file()
    result = _run_as(unix_accounts.member, f"open({str(part)!r}, 'rb')")
    assert result.returncode != 0
    assert "PermissionError" in result.stderr


def test_outsider_helper_gets_chinese_error(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    folder = build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    result = _run_as(
        unix_accounts.outsider,
        "import regsandbox_kernel as rs\n"
        "try:\n"
        "    rs.tables()\n"
        "except rs.SandboxAccessError as error:\n"
        "    print(error.code, error.path)\n"
        "    print(error.message)\n",
        REGSANDBOX_EXTRACT_DIR=str(folder),
    )
    assert result.returncode == 0, result.stderr
    code_line, message = result.stdout.splitlines()
    assert code_line.split() == ["SANDBOX_ACCESS_DENIED", os.path.join(os.path.realpath(folder), "manifest.json")]
    assert "无权读取数据提取清单" in message


def test_unreadable_table_file_translated(unix_accounts: UnixFixture, traversable_settings: Settings) -> None:
    folder = build_extract(traversable_settings, "bank_a", unix_group=unix_accounts.bank_a_group)
    os.chmod(folder / "applications.parquet", 0o600)
    result = _run_as(
        unix_accounts.member,
        "import regsandbox_kernel as rs\n"
        "try:\n"
        "    rs.table('applications')\n"
        "except rs.SandboxAccessError as error:\n"
        "    print(error.code, error.path)\n",
        REGSANDBOX_EXTRACT_DIR=str(folder),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SANDBOX_ACCESS_DENIED",
                                     os.path.join(os.path.realpath(folder), "applications.parquet")]
