"""Error responses of the API and the console.

Every API error body is ``{"code": "<STABLE_ENGLISH_CODE>", "detail": "<中文说明>"}``. Console pages
show the same message as HTML, and a console request without a session is sent to the login form.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from admin_api.limits import TOO_LARGE_CODE, TOO_LARGE_DETAIL
from regsandbox_core.errors import RegsandboxError

logger = logging.getLogger(__name__)

_FIELD_NAMES = {
    "username": "用户名",
    "password": "密码",
    "decision": "审查结论",
    "comment": "审查意见",
    "name": "名称",
    "notebook_id": "报告笔记本编号",
    "cron": "调度表达式",
    "recipients": "收件人",
    "enabled": "启用状态",
    "trigger": "触发方式",
    "status": "状态",
    "actor": "操作人",
    "action": "操作",
    "resource": "对象",
    "outcome": "结果",
    "limit": "条数",
    "reason": "吊销原因",
    "confirm": "确认文本",
    "version": "版本号",
    "level": "安全级别",
    "pi_category": "个人金融信息类别",
    "kind": "字段语义类型",
    "data_owner": "数据责任部门",
    "purpose": "重新生成原因",
    "content": "脱敏策略内容",
    "rejection_reason": "驳回原因",
    "override_reason": "强制发布理由",
}


class ApiError(RegsandboxError):
    """A RegsandboxError raised by a route; ``status`` is the HTTP status of the response."""


def unauthenticated(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=401)


def forbidden(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=403)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=404)


def conflict(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=409)


def invalid(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=422)


def _is_console(request: Request) -> bool:
    return request.url.path.startswith("/console")


def _render(request: Request, error: RegsandboxError, status: int) -> Response:
    if not _is_console(request):
        return JSONResponse(error.as_dict(), status_code=status)
    if status == 401:
        return RedirectResponse("/console/login", status_code=303)
    templates = request.app.state.templates
    return templates.TemplateResponse(
        request, "error.html", {"code": error.code, "message": error.message, "principal": None}, status_code=status
    )


def _problem(item: dict[str, Any]) -> str:
    """Describe one pydantic validation error in Chinese."""
    kind = str(item.get("type", ""))
    context = item.get("ctx") or {}
    if kind in ("string_too_long", "too_long"):
        return f"超过上限 {context.get('max_length', '')}"
    if kind in ("string_too_short", "too_short"):
        return f"少于下限 {context.get('min_length', '')}"
    if kind == "literal_error":
        return f"只能是 {context.get('expected', '')}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"不能小于 {context.get('ge', context.get('gt', ''))}"
    if kind in ("less_than_equal", "less_than"):
        return f"不能大于 {context.get('le', context.get('lt', ''))}"
    if kind == "extra_forbidden":
        return "不是可接受的字段，请删除"
    return _TYPE_PROBLEMS.get(kind, "格式无效")


_TYPE_PROBLEMS = {
    "int_parsing": "应为整数",
    "int_type": "应为整数",
    "bool_parsing": "应为 true 或 false",
    "bool_type": "应为 true 或 false",
    "string_type": "应为字符串",
    "list_type": "应为列表",
    "model_attributes_type": "应为 JSON 对象",
    "dict_type": "应为 JSON 对象",
    "json_invalid": "不是有效的 JSON",
}


_SECRET_FIELD = re.compile(r"password|secret|token|totp|credential|^code$", re.IGNORECASE)
"""Fields whose value a validation message leaves out, so that a password never appears in a response or log."""


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
        field = ".".join(location) or "请求体"
        label = _FIELD_NAMES.get(location[-1], field) if location else field
        if item.get("type") == "missing":
            parts.append(f"缺少字段 {field}（{label}）")
            continue
        value = item.get("input")
        secret = bool(location) and _SECRET_FIELD.search(location[-1]) is not None
        value_text = f" 的值 {repr(value)[:80]}" if isinstance(value, (str, int, float, bool)) and not secret else ""
        parts.append(f"字段 {field}（{label}）{value_text}{_problem(item)}")
    return "；".join(parts) + "。请按接口说明修正后重试。"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RegsandboxError)
    async def _regsandbox_error(request: Request, error: RegsandboxError) -> Response:
        return _render(request, error, error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        return _render(request, ApiError("INVALID_REQUEST", _describe_validation(error)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            wrapped = ApiError("NOT_FOUND", f"地址 {request.url.path} 不存在，请检查请求路径。")
        elif error.status_code == 413:
            wrapped = ApiError(TOO_LARGE_CODE, TOO_LARGE_DETAIL)
        elif error.status_code == 405:
            wrapped = ApiError("METHOD_NOT_ALLOWED", f"地址 {request.url.path} 不支持 {request.method} 请求。")
        else:
            wrapped = ApiError("HTTP_ERROR", f"请求失败（HTTP {error.status_code}）。")
        return _render(request, wrapped, error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error on %s %s (request %s)", request.method, request.url.path,
                         getattr(request.state, "request_id", "-"))
        wrapped = ApiError("INTERNAL_ERROR", "服务内部错误，请稍后重试；如持续出现，请联系系统管理员并提供请求编号。")
        return _render(request, wrapped, 500)
