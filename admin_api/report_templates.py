"""报表模板管理: list, read, download, check, add and delete versions of report templates.

The templates come from :mod:`intake.template_store`: the shipped ones and the versions a system
administrator added in ``<data_dir>/templates``. A version is in use when a collection task
(报送任务) or a report submission (报表报送) names it. A version in use is immutable: uploading a
file with its code and version, or deleting it, is rejected with 409 ``TEMPLATE_IN_USE``. Every
write and every download is audited.

The API routes (:mod:`admin_api.routes.templates`) and the console pages
(:mod:`admin_api.console_templates`) call these functions, so both check and audit the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admin_api import submissions
from admin_api.audit import add_event
from admin_api.errors import conflict
from admin_api.models import ReportSubmission, ReportTask
from admin_api.security import Principal, allows
from intake import template_store
from intake.template_model import (
    FIELD_TYPE_NAMES,
    FREQUENCY_NAMES,
    RULE_KIND_NAMES,
    SEVERITY_NAMES,
    AUTO_RULE_PREFIX,
    CompareRule,
    FluctuationRule,
    ReconcileRule,
    Template,
    TemplateError,
)
from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.settings import Settings

# admin_api.submissions caches the catalog with lru_cache; a reload must drop that copy.
template_store.on_reload(submissions.catalog.cache_clear)

SOURCE_NAMES = {"shipped": "随系统发布", "added": "管理员添加"}
KIND_NAMES = {"detail": "明细表", "aggregate": "汇总报表"}


def configure_templates(settings: Settings) -> template_store.CatalogState:
    """Load every template at start, with ``<data_dir>/templates`` as the folder of added versions.

    Raises ``ConfigurationError`` when a shipped template is invalid. Invalid added files are
    left out and listed in the returned state (see :mod:`intake.template_store`).
    """
    try:
        return template_store.configure(template_store.added_folder_of(settings.data_dir))
    except TemplateError as error:
        raise ConfigurationError(error.code, error.message) from error


# --- usage by tasks and submissions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """How many collection tasks and report submissions name one template version."""

    tasks: int = 0
    submissions: int = 0

    @property
    def in_use(self) -> bool:
        return self.tasks > 0 or self.submissions > 0

    def describe(self) -> str:
        parts = []
        if self.tasks:
            parts.append(f"{self.tasks} 个报送任务")
        if self.submissions:
            parts.append(f"{self.submissions} 条报送记录")
        return "和".join(parts)


def usage_counts(session: Session, code: str | None = None) -> dict[tuple[str, int], Usage]:
    """Return the usage of every template version that a task or submission names, of ``code`` only if given."""
    counts: dict[tuple[str, int], dict[str, int]] = {}
    for model, key in ((ReportTask, "tasks"), (ReportSubmission, "submissions")):
        statement = select(model.template_code, model.template_version, func.count()).group_by(
            model.template_code, model.template_version)
        if code is not None:
            statement = statement.where(model.template_code == code)
        for template_code, version, count in session.execute(statement):
            counts.setdefault((template_code, version), {})[key] = count
    return {item: Usage(**values) for item, values in counts.items()}


def _next_version(code: str) -> int:
    versions = submissions.catalog().versions(code)
    return max(versions) + 1 if versions else 1


def _in_use_error(template_label: str, code: str, usage: Usage, action: str) -> TemplateError:
    if action == "删除":
        advice = "已使用的版本须保留，以便核对据此校验的报送。如不再使用，请上传新版本并在新的报送任务中使用新版本。"
    else:
        advice = f"已使用的版本保持不变，请把文件中的 version 改为 {_next_version(code)}，作为新版本上传。"
    return TemplateError(
        "TEMPLATE_IN_USE",
        f"报表模板 {template_label} 已被 {usage.describe()}使用，不能{action}。{advice}",
        status=409,
    )


# --- output models ---------------------------------------------------------------------------------------


class VersionOut(BaseModel):
    code: str
    name: str
    version: int
    standard: str
    kind: str
    kind_name: str
    frequency: str
    frequency_name: str
    digest: str
    """SM3 of the template content and the shared code lists it uses (64 hex characters)."""
    source: str
    """``shipped`` (随系统发布, read-only) or ``added`` (管理员添加)."""
    source_name: str
    in_use: bool
    task_count: int
    submission_count: int
    deletable: bool
    """Whether a system administrator may delete this version: added and not in use."""

    @classmethod
    def of(cls, template: Template, usage: Usage) -> VersionOut:
        source = "shipped" if template_store.is_shipped(template) else "added"
        return cls(
            code=template.code, name=template.name, version=template.version, standard=template.standard,
            kind=template.kind, kind_name=KIND_NAMES[template.kind], frequency=template.frequency,
            frequency_name=FREQUENCY_NAMES[template.frequency], digest=template.digest, source=source,
            source_name=SOURCE_NAMES[source], in_use=usage.in_use, task_count=usage.tasks,
            submission_count=usage.submissions, deletable=source == "added" and not usage.in_use,
        )


class TemplateOut(BaseModel):
    code: str
    name: str
    """Name of the newest version."""
    in_use: bool
    """Whether any version is in use."""
    versions: list[VersionOut]


class BrokenFileOut(BaseModel):
    file: str
    code: str
    detail: str


class TemplateListing(BaseModel):
    templates: list[TemplateOut]
    broken_files: list[BrokenFileOut]
    """Files of the data directory that were not loaded; shown to holders of ``templates.write`` only."""


class FieldOut(BaseModel):
    code: str
    name: str
    type: str
    type_name: str
    length: int | None
    precision: int | None
    scale: int | None
    required: bool
    code_list: str | None
    multi: bool
    role: str | None
    """采集日期, 金融许可证号 or 备注 for the fields with that role, else None."""
    description: str | None


class CodeOut(BaseModel):
    code: str
    label: str


class CodeListOut(BaseModel):
    name: str
    shared: bool
    description: str | None
    codes: list[CodeOut]


class RuleOut(BaseModel):
    id: str
    name: str
    kind: str
    kind_name: str
    severity: str
    severity_name: str
    fields: list[str]
    conditional: bool
    """Whether the rule applies only to the rows where its ``when`` condition holds."""
    derived: bool
    """Whether the loader derived the rule from a field declaration or the primary key (ids ``AUTO-``)."""
    description: str | None


class LineOut(BaseModel):
    code: str
    name: str


class TemplateDetail(VersionOut):
    description: str | None
    delimiter: str
    header: bool
    fields: list[FieldOut]
    primary_key: list[str]
    code_lists: list[CodeListOut]
    lines: list[LineOut]
    rules: list[RuleOut]


class Problem(BaseModel):
    code: str
    detail: str


class CheckResult(BaseModel):
    ok: bool
    problems: list[Problem]
    """Every problem found, in the order of the file; empty when ``ok``."""
    template: VersionOut | None
    """The version the file declares, when it could be parsed and has no problem."""


# --- reading ---------------------------------------------------------------------------------------------


def list_templates(session: Session, caller: Principal, query: str = "") -> TemplateListing:
    """Return every template with its versions, filtered by ``query`` on code or name (case-insensitive)."""
    state = template_store.current_state()
    usage = usage_counts(session)
    needle = query.strip().casefold()
    items = []
    for code in state.catalog.codes():
        versions = [state.catalog.get(code, number) for number in state.catalog.versions(code)]
        if needle and not any(needle in text.casefold() for item in versions for text in (item.code, item.name)):
            continue
        rows = [VersionOut.of(item, usage.get((code, item.version), Usage())) for item in versions]
        items.append(TemplateOut(code=code, name=versions[-1].name, in_use=any(row.in_use for row in rows),
                                 versions=rows))
    broken = []
    if allows(caller.role, "templates.write"):
        broken = [BrokenFileOut(file=item.path.name, code=item.code, detail=item.message) for item in state.broken]
    return TemplateListing(templates=items, broken_files=broken)


def _rule_fields(rule: Any) -> list[str]:
    if isinstance(rule, CompareRule):
        return [rule.left] + ([rule.right.field] if rule.right is not None and rule.right.field else [])
    if isinstance(rule, ReconcileRule):
        return [rule.left.field] if rule.left.field else []
    if isinstance(rule, FluctuationRule):
        return [rule.measure.field] if rule.measure.field else []
    return list(getattr(rule, "fields", ()))


def _role(template: Template, code: str) -> str | None:
    item = template.field(code)
    if item.period:
        return "采集日期"
    if item.institution:
        return "金融许可证号"
    if item.remark:
        return "备注"
    return None


def _code_lists(template: Template) -> list[CodeListOut]:
    names = list(template.code_lists)
    for item in template.fields:
        if item.code_list and item.code_list not in names:
            names.append(item.code_list)
    for rule in template.rules:
        name = getattr(rule, "code_list", None)
        if name and name not in names:
            names.append(name)
    result = []
    for name in names:
        code_list = template.code_list(name)
        result.append(CodeListOut(
            name=name, shared=name not in template.code_lists, description=code_list.description,
            codes=[CodeOut(code=code, label=label) for code, label in code_list.codes.items()],
        ))
    return result


def template_detail(session: Session, code: str, version: int) -> TemplateDetail:
    """Return one version with its fields, primary key, code lists and rules (declared and derived).

    Raises ``TemplateError`` 404 for an unknown code or version.
    """
    template = template_store.current_catalog().get(code, version)
    usage = usage_counts(session, code).get((code, version), Usage())
    summary = VersionOut.of(template, usage)
    fields = [
        FieldOut(code=item.code, name=item.name, type=item.type, type_name=FIELD_TYPE_NAMES[item.type],
                 length=item.length, precision=item.precision, scale=item.scale, required=item.required,
                 code_list=item.code_list, multi=item.multi, role=_role(template, item.code),
                 description=item.description)
        for item in template.fields
    ]
    rules = [
        RuleOut(id=rule.id, name=rule.name, kind=rule.kind, kind_name=RULE_KIND_NAMES[rule.kind],
                severity=rule.severity, severity_name=SEVERITY_NAMES[rule.severity], fields=_rule_fields(rule),
                conditional=getattr(rule, "when", None) is not None, derived=rule.id.startswith(AUTO_RULE_PREFIX),
                description=rule.description)
        for rule in template.effective_rules()
    ]
    return TemplateDetail(
        **summary.model_dump(), description=template.description, delimiter=template.file.delimiter,
        header=template.file.header, fields=fields, primary_key=list(template.primary_key),
        code_lists=_code_lists(template), lines=[LineOut(code=line.code, name=line.name) for line in template.lines],
        rules=rules,
    )


def download(session: Session, request: Request, caller: Principal, code: str, version: int) -> tuple[bytes, str]:
    """Return the YAML file of a version and its file name; the download is audited."""
    template = template_store.current_catalog().get(code, version)
    assert template.source_path is not None
    content = template.source_path.read_bytes()
    add_event(session, request, caller, "templates.download", f"template:{code}.v{version}", "success",
              {"digest": template.digest})
    session.commit()
    return content, template_store.file_name(code, version)


# --- writing ---------------------------------------------------------------------------------------------


def _check_not_taken(session: Session, candidate: Template) -> None:
    """Reject a code and version that exists, with the in-use message when a task or submission names it."""
    catalog = template_store.current_catalog()
    if candidate.version not in catalog.versions(candidate.code):
        return
    existing = catalog.get(candidate.code, candidate.version)
    usage = usage_counts(session, candidate.code).get((candidate.code, candidate.version), Usage())
    if usage.in_use:
        raise _in_use_error(existing.label, candidate.code, usage, "替换")
    if template_store.is_shipped(existing):
        advice = "随系统发布的版本不能替换"
    else:
        advice = "如要替换这个尚未使用的版本，请先删除它再上传"
    raise conflict(
        "TEMPLATE_VERSION_EXISTS",
        f"报表模板 {existing.label} 已存在，不能重复上传。请把文件中的 version 改为 "
        f"{_next_version(candidate.code)}，作为新版本上传；{advice}。",
    )


def check_upload(session: Session, content: bytes, filename: str) -> CheckResult:
    """Check an uploaded file as :func:`upload` would, without storing it, and list every problem."""
    try:
        state = template_store.current_state()
        candidate = template_store.parse_file(content, filename, state)
        _check_not_taken(session, candidate)
        candidate = template_store.parse_upload(content, filename, state)
    except RegsandboxError as error:  # TemplateError from the checks, ApiError for an existing version
        problems = getattr(error, "problems", ()) or ((error.code, error.message),)
        return CheckResult(ok=False, problems=[Problem(code=code, detail=text) for code, text in problems],
                           template=None)
    return CheckResult(ok=True, problems=[], template=VersionOut.of(candidate, Usage()))


def upload(session: Session, request: Request, caller: Principal, content: bytes, filename: str) -> Template:
    """Check and store a new template version, audit it and reload the catalog; return the stored version.

    Raises ``TemplateError`` (422 invalid file, 409 duplicate) or ``ApiError`` 409 for an existing
    version. Nothing is stored when any check fails or the audit event cannot be committed.
    """
    state = template_store.current_state()
    candidate = template_store.parse_file(content, filename, state)
    _check_not_taken(session, candidate)
    stored = template_store.add_version(content, filename)
    add_event(session, request, caller, "templates.upload", f"template:{stored.code}.v{stored.version}", "success",
              {"digest": stored.digest, "file": template_store.file_name(stored.code, stored.version),
               "uploaded_name": filename[:200]})
    try:
        session.commit()
    except Exception:
        session.rollback()
        template_store.remove_version(stored.code, stored.version)
        raise
    return stored


def delete(session: Session, request: Request, caller: Principal, code: str, version: int) -> Template:
    """Delete an added version that no task or submission uses; audited. Raises 409 ``TEMPLATE_IN_USE`` otherwise."""
    template = template_store.current_catalog().get(code, version)
    usage = usage_counts(session, code).get((code, version), Usage())
    if usage.in_use:
        raise _in_use_error(template.label, code, usage, "删除")
    # NOTE: a task created between this check and the removal would name a deleted version;
    # the service runs as one process, and template deletions are rare administrator actions.
    removed = template_store.remove_version(code, version)
    add_event(session, request, caller, "templates.delete", f"template:{code}.v{version}", "success",
              {"digest": removed.digest})
    session.commit()
    return removed
