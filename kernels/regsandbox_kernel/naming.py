"""Names of MLflow experiments and registered models, prefixed with the caller's institution.

The model registry grants each institution access to experiments named ``<code>/<name>`` and
registered models named ``<code>.<name>`` only, so notebooks build names through these helpers.
"""

from __future__ import annotations

import os
import re

from regsandbox_kernel.errors import ExtractNotConfiguredError, InvalidNameError

INSTITUTION_ENV = "REGSANDBOX_INSTITUTION"
_INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")


def current_institution() -> str:
    """Return the institution code of this sandbox from REGSANDBOX_INSTITUTION or the extract manifest."""
    code = os.environ.get(INSTITUTION_ENV, "").strip()
    if not code:
        from regsandbox_kernel.extract import manifest

        code = str(manifest().get("institution", ""))
    if not _INSTITUTION_CODE.match(code):
        raise ExtractNotConfiguredError(
            "INSTITUTION_NOT_CONFIGURED",
            f"无法确定本沙箱所属机构：环境变量 {INSTITUTION_ENV} 的值 {code!r} 不是有效的机构代码。请联系系统管理员检查沙箱配置。",
        )
    return code


def _checked_name(name: str, kind: str) -> str:
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InvalidNameError("INVALID_NAME", f"{kind}名称不能为空，请传入例如 'scorecard' 这样的名称。")
    return cleaned


def mlflow_experiment(name: str) -> str:
    """Return the MLflow experiment name ``<institution>/<name>``; a name that already has the prefix is kept."""
    code = current_institution()
    cleaned = _checked_name(name, "实验")
    if cleaned.startswith(f"{code}/"):
        return cleaned
    return f"{code}/{cleaned}"


def registered_model_name(name: str) -> str:
    """Return the registered model name ``<institution>.<name>``; a name that already has the prefix is kept."""
    code = current_institution()
    cleaned = _checked_name(name, "模型")
    if cleaned.startswith(f"{code}."):
        return cleaned
    return f"{code}.{cleaned}"
