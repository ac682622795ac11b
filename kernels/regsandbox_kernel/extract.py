"""Read the institution's masked extract from a notebook through a locked, in-memory DuckDB.

The spawner sets ``REGSANDBOX_EXTRACT_DIR`` to the institution's extract folder. Every
connection made here may read files in that folder only: DuckDB's ``allowed_directories`` is
set to the folder's real path, external access is switched off and the configuration is locked
before any table is exposed. Each table of the manifest then becomes a view of the same name,
so queries can read ``SELECT ... FROM applications``.

Before anything is exposed, the detached SM2 signature ``manifest.json.sig`` is verified against
the platform's public signing keys in ``platform_signing_keys.json``: the file named by
``REGSANDBOX_TRUSTED_KEYS``, else the one beside the extract link (``<data_dir>/extracts/``),
which only the extract builder can write. A manifest that does not verify raises
:class:`ExtractNotConfiguredError` (``MANIFEST_SIGNATURE_INVALID``) and no connection is opened.
Verification needs ``cryptography``, ``tongsuopy`` and ``gmssl`` (imported only then).
:func:`verify_tables` also compares each table file with its SM3 digest in the manifest.

The lock binds one connection only; a plain ``duckdb.connect()`` in the same process reads
whatever the operating system allows. The boundary between institutions is therefore the file
permissions of the extract folders (0750 root:<institution group>), and this module turns
DuckDB's refusals into clear errors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from regsandbox_core.errors import RegsandboxError
from regsandbox_kernel.errors import ExtractNotConfiguredError, SandboxAccessError, UnknownTableError

EXTRACT_DIR_ENV = "REGSANDBOX_EXTRACT_DIR"
TRUSTED_KEYS_ENV = "REGSANDBOX_TRUSTED_KEYS"
MANIFEST_NAME = "manifest.json"
TRUSTED_KEYS_NAME = "platform_signing_keys.json"
MANIFEST_SIGNATURE_KIND = "extract_manifest"

_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DENIED_PATH = re.compile(r'Cannot access (?:file|directory) "([^"]*)"')
_OS_DENIED_PATH = re.compile(r'(?:file|directory) "([^"]*)".*Permission denied', re.DOTALL)
# Statements that write files. DuckDB would allow them inside the extract folder, so they are
# rejected before DuckDB runs them.
_WRITING_STATEMENTS = {duckdb.StatementType.COPY, duckdb.StatementType.EXPORT, duckdb.StatementType.COPY_DATABASE}

_default_connection: duckdb.DuckDBPyConnection | None = None
_default_connection_dir: Path | None = None


def extract_dir() -> Path:
    """Return the real path of the extract folder named by REGSANDBOX_EXTRACT_DIR."""
    configured = os.environ.get(EXTRACT_DIR_ENV, "").strip()
    if not configured:
        raise ExtractNotConfiguredError(
            "EXTRACT_DIR_NOT_SET",
            f"未设置环境变量 {EXTRACT_DIR_ENV}，无法定位本机构的数据提取目录。请通过监管沙箱（JupyterHub）启动笔记本，或联系系统管理员。",
        )
    folder = Path(os.path.realpath(configured))
    if not folder.is_dir():
        raise ExtractNotConfiguredError(
            "EXTRACT_DIR_MISSING",
            f"数据提取目录 {folder} 不存在或无权访问。请联系系统管理员生成本机构的数据提取（运维命令 python -m admin_api.manage extracts-build）。",
        )
    return folder


def manifest() -> dict[str, Any]:
    """Return the extract's manifest: institution, build, policy, tables with columns, classes, row counts and SM3."""
    return _read_manifest(extract_dir())


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except PermissionError as error:
        raise SandboxAccessError(
            "SANDBOX_ACCESS_DENIED",
            f"无权读取数据提取清单 {path}。请确认您的账号属于本机构的沙箱用户组，或联系系统管理员。",
            path=str(path),
        ) from error
    except (OSError, ValueError) as error:
        raise ExtractNotConfiguredError(
            "MANIFEST_INVALID",
            f"数据提取清单 {path} 缺失或格式错误（{type(error).__name__}）。请联系系统管理员重新生成数据提取。",
        ) from error
    if not isinstance(document, dict) or not isinstance(document.get("tables"), list):
        raise ExtractNotConfiguredError(
            "MANIFEST_INVALID", f"数据提取清单 {path} 缺少 tables 列表。请联系系统管理员重新生成数据提取。"
        )
    return document


def tables() -> list[str]:
    """Return the names of the tables in the extract, in manifest order."""
    return [str(entry["name"]) for entry in manifest()["tables"]]


def _table_files(folder: Path, document: dict[str, Any]) -> dict[str, Path]:
    """Map each manifest table to its file, rejecting names and files that could leave the folder."""
    files: dict[str, Path] = {}
    for entry in document["tables"]:
        name, file_name = str(entry.get("name", "")), str(entry.get("file", ""))
        if not _TABLE_NAME.match(name) or file_name in {"", ".", ".."} or Path(file_name).name != file_name:
            raise ExtractNotConfiguredError(
                "MANIFEST_INVALID",
                f"数据提取清单中的表 {name!r}（文件 {file_name!r}）名称无效。请联系系统管理员重新生成数据提取。",
            )
        files[name] = folder / file_name
    return files


def _check_institution(document: dict[str, Any], expected: str | None = None) -> None:
    """Raise EXTRACT_INSTITUTION_MISMATCH unless the manifest names ``expected`` (default: REGSANDBOX_INSTITUTION)."""
    if expected is None:
        expected = os.environ.get("REGSANDBOX_INSTITUTION", "").strip()
    found = str(document.get("institution", ""))
    if expected and found != expected:
        raise ExtractNotConfiguredError(
            "EXTRACT_INSTITUTION_MISMATCH",
            f"数据提取目录属于机构 {found}，与本沙箱所属机构 {expected} 不一致，已拒绝使用。请联系系统管理员检查沙箱配置。",
        )


def trusted_keys_file() -> Path:
    """Return the trusted public keys file: REGSANDBOX_TRUSTED_KEYS, else beside the (unresolved) extract link."""
    configured = os.environ.get(TRUSTED_KEYS_ENV, "").strip()
    if configured:
        return Path(configured)
    return Path(os.environ.get(EXTRACT_DIR_ENV, "").strip()).parent / TRUSTED_KEYS_NAME


def _trusted_keys(path: Path | None = None) -> dict[str, bytes]:
    path = trusted_keys_file() if path is None else path
    try:
        status = path.stat()
        document = json.loads(path.read_text(encoding="utf-8"))
        keys = {str(label): bytes.fromhex(value) for label, value in document["keys"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ExtractNotConfiguredError(
            "TRUSTED_KEYS_MISSING",
            f"无法读取平台签名公钥文件 {path}（{type(error).__name__}），不能验证数据提取清单的签名，已拒绝打开。"
            "请联系系统管理员重新生成数据提取（运维命令 python -m admin_api.manage extracts-build），或设置 REGSANDBOX_TRUSTED_KEYS。",
        ) from error
    if status.st_mode & 0o022 or status.st_uid not in (0, os.geteuid()):
        raise ExtractNotConfiguredError(
            "TRUSTED_KEYS_UNSAFE",
            f"平台签名公钥文件 {path} 可被其他用户修改（属主 {status.st_uid}，权限 {status.st_mode & 0o777:o}），不能作为信任依据，已拒绝打开。"
            "请联系系统管理员把它改为 root 所有、权限 0644。",
        )
    return keys


def verify_manifest_signature(folder: Path | None = None, trusted_keys: Path | None = None) -> None:
    """Verify ``manifest.json.sig`` of the extract against the trusted keys; raise MANIFEST_SIGNATURE_INVALID otherwise.

    ``folder`` defaults to :func:`extract_dir` and ``trusted_keys`` to :func:`trusted_keys_file`.
    """
    folder = extract_dir() if folder is None else folder
    path = folder / MANIFEST_NAME
    trusted = _trusted_keys(trusted_keys)
    try:
        from regsandbox_core.signing import verify_file
    except ImportError as error:
        raise ExtractNotConfiguredError(
            "SIGNATURE_CHECK_UNAVAILABLE",
            f"沙箱环境缺少验证 SM2 签名所需的软件包（{error.name}），不能确认数据提取清单未被篡改，已拒绝打开。请联系系统管理员。",
        ) from error
    try:
        verified = verify_file(path, trusted)
    except RegsandboxError as error:
        raise ExtractNotConfiguredError(
            "MANIFEST_SIGNATURE_INVALID",
            f"数据提取清单 {path} 的 SM2 签名验证失败，已拒绝打开该数据提取：{error.message} 请联系系统管理员重新生成数据提取。",
        ) from error
    if verified.kind != MANIFEST_SIGNATURE_KIND:
        raise ExtractNotConfiguredError(
            "MANIFEST_SIGNATURE_INVALID",
            f"数据提取清单 {path} 的签名类型为 {verified.kind}，不是数据提取清单签名，已拒绝打开。请联系系统管理员。",
        )


def verify_tables() -> None:
    """Compare each table file's SM3 digest with the signed manifest (reads every file once)."""
    folder = extract_dir()
    document = _read_manifest(folder)
    verify_manifest_signature(folder)
    _verify_table_digests(folder, document)


def verify_extract(folder: Path, institution: str, trusted_keys: Path, *, tables: bool = True) -> dict[str, Any]:
    """Check an extract folder as :func:`connect` would, without the sandbox's environment variables.

    Checks the manifest's format and institution, its SM2 signature against ``trusted_keys`` and,
    when ``tables`` is true, each table file's SM3 digest (which reads every file once). Returns
    the manifest. Raises :class:`ExtractNotConfiguredError` or :class:`SandboxAccessError` with
    the codes of the other functions here. The hub's spawner calls it before starting a sandbox.
    """
    folder = Path(os.path.realpath(folder))
    document = _read_manifest(folder)
    _check_institution(document, institution)
    _table_files(folder, document)
    verify_manifest_signature(folder, trusted_keys)
    if tables:
        _verify_table_digests(folder, document)
    return document


def _verify_table_digests(folder: Path, document: dict[str, Any]) -> None:
    from regsandbox_core.crypto import sm3_file

    for entry in document["tables"]:
        path = _table_files(folder, {"tables": [entry]})[str(entry["name"])]
        try:
            digest = sm3_file(path)
        except OSError as error:
            raise ExtractNotConfiguredError(
                "EXTRACT_TABLE_MISSING",
                f"无法读取数据提取文件 {path}（{error.strerror}），不能确认它与已签名清单一致。请联系系统管理员重新生成数据提取。",
            ) from error
        if "sm3" in entry and digest != entry["sm3"]:
            raise ExtractNotConfiguredError(
                "EXTRACT_TABLE_MODIFIED",
                f"数据提取文件 {path} 的 SM3 杂凑值与已签名清单不一致，文件在生成后被修改。请联系系统管理员重新生成数据提取。",
            )


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _access_error(error: duckdb.Error, folder: Path) -> SandboxAccessError | None:
    """Translate a DuckDB refusal or an operating-system denial into SandboxAccessError."""
    message = str(error)
    if isinstance(error, duckdb.PermissionException):
        match = _DENIED_PATH.search(message)
        if match is None:  # refusals without a file, such as LOAD of an extension
            return SandboxAccessError(
                "SANDBOX_ACCESS_DENIED",
                f"沙箱拒绝了该操作：只能读取本机构数据提取目录 {folder} 中的文件，不能加载或安装扩展、写出文件或连接其他数据库。",
            )
        return SandboxAccessError(
            "SANDBOX_ACCESS_DENIED",
            f"沙箱禁止访问 {match.group(1)}：只能读取本机构数据提取目录 {folder} 中的文件，"
            "且不能写出文件、安装扩展或连接其他数据库。请用 tables()、table(表名) 或在 SQL 中直接使用表名（如 applications）。",
            path=match.group(1),
        )
    if isinstance(error, duckdb.IOException) and "Permission denied" in message:
        match = _OS_DENIED_PATH.search(message)
        path = match.group(1) if match else str(folder)
        return SandboxAccessError(
            "SANDBOX_ACCESS_DENIED",
            f"操作系统拒绝读取 {path}（权限不足）。请确认您的账号属于本机构的沙箱用户组，或联系系统管理员。",
            path=path,
        )
    return None


def connect() -> duckdb.DuckDBPyConnection:
    """Open a new in-memory DuckDB connection that can read the extract folder only.

    Each manifest table is a view of its name. The settings are locked, so the connection
    cannot be widened later. Errors of this raw connection are DuckDB's own; :func:`sql` and
    :func:`table` translate access refusals into :class:`SandboxAccessError`.
    """
    folder = extract_dir()
    document = _read_manifest(folder)
    _check_institution(document)
    files = _table_files(folder, document)
    verify_manifest_signature(folder)

    con = duckdb.connect(":memory:")
    try:
        # DuckDB adds its temp_directory (default ".tmp" in the working directory) to the allowed
        # directories. With it switched off nothing spills to disk, which these small extracts do not need.
        con.sql("SET temp_directory=''")
        con.sql(f"SET allowed_directories=[{_sql_literal(str(folder) + os.sep)}]")
        con.sql("SET enable_external_access=false")
        con.sql("SET lock_configuration=true")

        # DuckDB 2.0.1 binds a view's read_parquet again at every query, so each query is checked
        # against the locked settings. Creating the views after the lock means no object of
        # this connection was ever made under wider settings.
        for name, path in files.items():
            con.sql(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({_sql_literal(str(path))})')
    except duckdb.Error as error:
        con.close()
        translated = _access_error(error, folder)
        if translated is not None:
            raise translated from error
        raise
    return con


def _connection() -> duckdb.DuckDBPyConnection:
    """Return this process's shared connection, reopened when REGSANDBOX_EXTRACT_DIR changes."""
    global _default_connection, _default_connection_dir
    folder = extract_dir()
    if _default_connection is None or _default_connection_dir != folder:
        if _default_connection is not None:
            _default_connection.close()
        _default_connection = connect()
        _default_connection_dir = folder
    return _default_connection


def _reject_file_writes(con: duckdb.DuckDBPyConnection, query: str, folder: Path) -> None:
    for statement in con.extract_statements(query):
        if statement.type in _WRITING_STATEMENTS:
            raise SandboxAccessError(
                "SANDBOX_WRITE_REJECTED",
                f"沙箱中不允许 {statement.type.name} 语句写出文件（数据提取目录 {folder} 只读）。"
                "需要保存结果时，请用 sql(...) 返回的 polars DataFrame 写入个人目录。",
            )


def sql(query: str, params: list[Any] | dict[str, Any] | None = None) -> pl.DataFrame:
    """Run SQL on the extract and return the result of the last statement as a polars DataFrame.

    ``params`` fills ``?`` or ``$name`` placeholders. A statement without a result (for example
    ``CREATE TABLE``) returns an empty DataFrame. Raises SandboxAccessError when the query
    touches a file outside the extract folder or writes a file.
    """
    con = _connection()
    folder = extract_dir()
    try:
        _reject_file_writes(con, query, folder)
        relation = con.sql(query, params=params)
        if relation is None:
            return pl.DataFrame()
        # Polars reads the relation through the Arrow C stream interface. DuckDB's own
        # relation.pl() would import pyarrow, which this library does not require.
        return pl.DataFrame(relation)
    except duckdb.Error as error:
        translated = _access_error(error, folder)
        if translated is not None:
            raise translated from error
        raise


def table(name: str) -> pl.DataFrame:
    """Return a whole table of the extract as a polars DataFrame."""
    available = tables()
    if name not in available:
        raise UnknownTableError(
            "UNKNOWN_TABLE", f"数据提取中没有表 {name!r}。可用的表：{'、'.join(available) or '（无）'}。"
        )
    return sql(f'SELECT * FROM "{name}"')
