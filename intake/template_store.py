"""The report templates of the running platform: the shipped ones and the versions a system administrator added.

Shipped templates are the YAML files in ``intake/templates`` and are read-only. Versions that a
system administrator adds in the console are stored in ``<data_dir>/templates`` (mode 0700), one
file per version named ``<code>.v<version>.yaml``. Both use the shared code lists of
``intake/templates/code_lists.yaml``, and a code and version may exist only once across both.

Start-up behaviour: an invalid shipped template raises :class:`TemplateError`, so the service does
not start. An invalid file in the data directory (edited by hand, or broken by a change of a
shipped template or code list) is left out of the catalog and logged. :attr:`CatalogState.broken`
lists it with a Chinese message naming the file and the fix, and the other templates keep working.

The catalog is loaded once and cached. :func:`reload_catalog` reads the added files again (the
shipped ones are read once per process) and calls every callback registered with
:func:`on_reload`, so that callers who cache the catalog drop their copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from intake.template_model import (
    SHARED_CODE_LISTS_FILE,
    TEMPLATES_DIR,
    CodeList,
    ReconcileRule,
    ReferenceRule,
    Template,
    TemplateCatalog,
    TemplateError,
    check_cross_references,
    load_catalog,
    load_shared_code_lists,
    load_template_file,
)
from regsandbox_core.files import atomic_output, fsync_directory

logger = logging.getLogger(__name__)

ADDED_FOLDER_NAME = "templates"
"""Folder below the data directory that contains the versions added by the system administrator."""
MAX_TEMPLATE_BYTES = 1024 * 1024
"""Largest template file accepted for upload. The largest shipped template has 8 KB."""
_LOCK_FILE = ".lock"


@dataclass(frozen=True)
class BrokenFile:
    """A file in the data directory that was left out of the catalog, with the reason in Chinese."""

    path: Path
    code: str
    message: str


@dataclass(frozen=True)
class CatalogState:
    """The loaded catalog, the folder of added versions and the files of that folder that were left out."""

    catalog: TemplateCatalog
    added_folder: Path | None
    broken: tuple[BrokenFile, ...]
    shared_code_lists: dict[str, CodeList]


_lock = threading.RLock()
_added_folder: Path | None = None
_state: CatalogState | None = None
_listeners: list[Callable[[], None]] = []
_logged_broken: set[tuple[Path, str]] = set()
_shipped_cache: dict[Path, tuple[TemplateCatalog, dict[str, CodeList]]] = {}


def added_folder_of(data_dir: Path) -> Path:
    return Path(data_dir) / ADDED_FOLDER_NAME


def is_shipped(template: Template) -> bool:
    """Return whether ``template`` comes from the shipped, read-only folder."""
    path = template.source_path
    return path is not None and path.resolve().parent == TEMPLATES_DIR.resolve()


def on_reload(callback: Callable[[], None]) -> None:
    """Call ``callback`` after every reload, for example the ``cache_clear`` of a cached accessor."""
    with _lock:
        if callback not in _listeners:
            _listeners.append(callback)


def configure(folder: Path | None) -> CatalogState:
    """Use ``folder`` for added versions (created with mode 0700 if missing) and load the catalog.

    The folder applies to the whole process. Raises ``TemplateError`` when a shipped template is invalid.
    NOTE: another process that serves the same data directory keeps its cached catalog until it
    reloads or restarts; the launcher runs admin_api as a single process.
    """
    global _added_folder
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    with _lock:
        _added_folder = folder
        return reload_catalog()


def configured_folder() -> Path | None:
    """Return the folder of added versions that :func:`configure` set, or None."""
    return _added_folder


def current_state() -> CatalogState:
    """Return the cached catalog state, loading it on first use."""
    with _lock:
        if _state is None:
            return reload_catalog()
        return _state


def current_catalog() -> TemplateCatalog:
    return current_state().catalog


def reload_catalog() -> CatalogState:
    """Read the added templates again, then notify every :func:`on_reload` callback."""
    global _state
    with _lock:
        _state = load_state(_added_folder)
        for callback in list(_listeners):
            callback()
        return _state


def load_state(added_folder: Path | None) -> CatalogState:
    """Load the shipped templates and the valid files of ``added_folder``; see the module docstring."""
    shipped, shared = _shipped_templates(TEMPLATES_DIR)
    if added_folder is None or not added_folder.is_dir():
        return CatalogState(shipped, added_folder, (), shared)

    broken: list[BrokenFile] = []
    pending: list[Template] = []
    for path in sorted(added_folder.iterdir()):
        if path.name.startswith("."):
            continue  # the lock file and temporary files of writes in progress
        problem = _unloadable_reason(path)
        if problem:
            broken.append(_broken(path, "TEMPLATE_INVALID", f"数据目录中的文件 {path} {problem}"))
            continue
        try:
            pending.append(load_template_file(path, shared))
        except TemplateError as error:
            broken.append(_broken(path, error.code, error.message))

    accepted = list(shipped.all())
    # Added versions may refer to each other, so admit them in passes until no more fit.
    for _ in range(len(pending) + 1):
        rejected: list[tuple[Template, TemplateError]] = []
        for template in pending:
            try:
                check_admission(template, accepted)
            except TemplateError as error:
                rejected.append((template, error))
            else:
                accepted.append(template)
        if len(rejected) == len(pending):
            break
        pending = [template for template, _ in rejected]
    for template, error in rejected:
        path = template.source_path or added_folder / template.code
        broken.append(_broken(path, error.code, error.message))
    return CatalogState(TemplateCatalog(accepted), added_folder, tuple(broken), shared)


def _shipped_templates(folder: Path) -> tuple[TemplateCatalog, dict[str, CodeList]]:
    """Return the shipped catalog and shared code lists of ``folder``, loaded once per process.

    The shipped files are part of the release and do not change while the service runs, so a
    reload after an upload reads only the added files.
    """
    key = folder.resolve()
    with _lock:
        if key not in _shipped_cache:
            catalog = load_catalog(folder)
            shared_path = folder / SHARED_CODE_LISTS_FILE
            shared = load_shared_code_lists(shared_path) if shared_path.exists() else {}
            _shipped_cache[key] = (catalog, shared)
        return _shipped_cache[key]


def _unloadable_reason(path: Path) -> str | None:
    if path.is_dir():
        return "是文件夹，不是模板文件"
    if path.suffix != ".yaml":
        return "的扩展名不是 .yaml。请通过控制台“报表模板”页面上传模板，或把扩展名改为 .yaml"
    if path.name == SHARED_CODE_LISTS_FILE:
        return "是共享代码表文件，但共享代码表只随系统发布。请把所需的代码表写进模板自己的 code_lists"
    return None


def _broken(path: Path, code: str, message: str) -> BrokenFile:
    text = (f"{message.rstrip('。')}。该文件未加载，其他模板不受影响。请在控制台上传修正后的新版本并把该文件移出"
            f"数据目录，或修正该文件后重启管理服务。")
    if (path, code) not in _logged_broken:  # every reload finds the file again; log it once
        _logged_broken.add((path, code))
        logger.error("template file %s in the data directory was not loaded: %s", path, code)
    return BrokenFile(path=path, code=code, message=text)


# --- admission of a new version and removal of an added one ----------------------------------------------


def _targets(template: Template) -> set[tuple[str, int | None]]:
    """Return the (code, version) pairs that the reference and reconcile rules of ``template`` look up."""
    found: set[tuple[str, int | None]] = set()
    for rule in template.rules:
        if isinstance(rule, ReferenceRule):
            found.add((rule.target.template, rule.target.version))
        elif isinstance(rule, ReconcileRule):
            found.add((rule.right.template, rule.right.version))
    return found


def dependents(code: str, version: int, templates: Iterable[Template]) -> list[Template]:
    """Return the templates whose rules look up ``code`` in every version or in ``version``."""
    return [
        template for template in templates
        if (template.code, template.version) != (code, version)
        and any(target == code and pinned in (None, version) for target, pinned in _targets(template))
    ]


def check_admission(candidate: Template, accepted: list[Template]) -> None:
    """Check that ``candidate`` can join ``accepted``: a new code and version whose references resolve.

    Templates that look up the candidate's code in every version must fit the candidate as well.
    Raises ``TemplateError`` naming the problem and the fix.
    """
    name = candidate.source_path.name if candidate.source_path else candidate.code
    for template in accepted:
        if (template.code, template.version) == (candidate.code, candidate.version):
            origin = "随系统发布的" if is_shipped(template) else "已添加的"
            raise TemplateError(
                "TEMPLATE_DUPLICATE",
                f"报表模板文件 {name} 无效：模板 {candidate.code} 第 {candidate.version} 版与{origin}文件 "
                f"{template.source_path.name if template.source_path else ''} 重复。请把 version 改为新的版本号。",
                status=409,
            )
    combined = TemplateCatalog([*accepted, candidate])
    check_cross_references(candidate, combined)
    failures: list[tuple[Template, TemplateError]] = []
    for template in dependents(candidate.code, candidate.version, accepted):
        try:
            check_cross_references(template, combined)
        except TemplateError as error:
            failures.append((template, error))
    if failures:
        labels = "、".join(template.label for template, _ in failures)
        raise TemplateError(
            "TEMPLATE_BREAKS_REFERENCE",
            f"报表模板文件 {name} 无效：{labels} 的规则引用 {candidate.code} 的所有版本，加入第 {candidate.version} 版后"
            f"这些引用不再成立。{failures[0][1].message}请在新版本中保留被引用的字段，或先为引用方添加固定 version 的新版本。",
            status=422,
            problems=[problem for _, error in failures for problem in (error.problems or ((error.code, error.message),))],
        )


def parse_file(content: bytes, file_label: str, state: CatalogState) -> Template:
    """Parse an uploaded template file and check it on its own, without other templates or storing it.

    ``file_label`` names the file in messages (its folder part is dropped). Raises ``TemplateError``
    (status 422) whose ``problems`` list every problem found.
    """
    label = Path(Path(file_label).name or "upload.yaml")
    if len(content) > MAX_TEMPLATE_BYTES:
        raise TemplateError(
            "TEMPLATE_TOO_LARGE",
            f"报表模板文件 {label} 有 {len(content)} 字节，超过上限 {MAX_TEMPLATE_BYTES} 字节。请检查是否选错了文件",
            status=422,
        )
    try:
        return load_template_file(label, state.shared_code_lists, content=content)
    except TemplateError as error:
        error.status = 422
        raise


def parse_upload(content: bytes, file_label: str, state: CatalogState) -> Template:
    """Parse an uploaded template file and check it against the templates of ``state``, without storing it.

    Raises ``TemplateError`` as :func:`parse_file` does, and 409 ``TEMPLATE_DUPLICATE`` for a code
    and version that exists.
    """
    candidate = parse_file(content, file_label, state)
    try:
        check_admission(candidate, list(state.catalog.all()))
    except TemplateError as error:
        if error.status == 500:
            error.status = 422
        raise
    return candidate


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold the in-process lock and an exclusive ``flock`` on the folder, so that writers never interleave."""
    with _lock:
        descriptor = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)


def _require_folder() -> Path:
    folder = _added_folder
    if folder is None:
        raise TemplateError(
            "TEMPLATE_STORE_UNCONFIGURED",
            "未配置存放新增报表模板的数据目录，无法保存模板。请通过管理服务启动平台后再操作。",
        )
    return folder


def file_name(code: str, version: int) -> str:
    return f"{code}.v{version}.yaml"


def add_version(content: bytes, file_label: str) -> Template:
    """Check and store a new template version atomically, reload the catalog and return the stored version.

    The file is written to a temporary file, fsynced and renamed, so a failure leaves no file behind.
    Raises ``TemplateError`` as :func:`parse_upload` does, or 409 when the file name is taken.
    """
    folder = _require_folder()
    with _folder_lock(folder):
        state = reload_catalog()
        candidate = parse_upload(content, file_label, state)
        target = folder / file_name(candidate.code, candidate.version)
        if target.exists():
            raise TemplateError(
                "TEMPLATE_VERSION_EXISTS",
                f"数据目录中已有文件 {target.name}（该文件未能加载）。请先把它移出数据目录，或改用新的版本号",
                status=409,
            )
        try:
            with atomic_output(target) as stream:
                stream.write(content)
        except OSError as error:
            raise TemplateError(
                "TEMPLATE_WRITE_FAILED",
                f"保存报表模板文件 {target.name} 失败（{error.strerror or error}），未做任何修改。"
                f"请检查数据目录 {folder} 的磁盘空间和权限后重新上传。",
                status=500,
            ) from error
        state = reload_catalog()
    return state.catalog.get(candidate.code, candidate.version)


def remove_version(code: str, version: int) -> Template:
    """Delete an added version's file and reload the catalog; return the removed template.

    Raises ``TemplateError``: 404 for an unknown version, 409 for a shipped version or one that
    other templates look up. The caller checks that no task or submission uses it.
    """
    folder = _require_folder()
    with _folder_lock(folder):
        state = reload_catalog()
        template = state.catalog.get(code, version)
        if is_shipped(template):
            raise TemplateError(
                "TEMPLATE_SHIPPED",
                f"报表模板 {template.label} 随系统发布，不能删除。如需调整，请上传新版本。",
                status=409,
            )
        remaining = [item for item in state.catalog.all() if item is not template]
        referrers = dependents(code, version, remaining)
        remaining_catalog = TemplateCatalog(remaining)
        blocking = []
        for item in referrers:
            try:
                check_cross_references(item, remaining_catalog)
            except TemplateError:
                blocking.append(item.label)
        if blocking:
            raise TemplateError(
                "TEMPLATE_REFERENCED",
                f"报表模板 {template.label} 被 {'、'.join(blocking)} 的规则引用，删除后这些规则将无法检查。"
                f"请先删除或替换引用它的模板版本。",
                status=409,
            )
        path = template.source_path
        assert path is not None
        path.unlink()
        fsync_directory(folder)
        reload_catalog()
    return template
