"""The console page API参数配置: external endpoints for system administrators, read-only for security administrators.

The forms call the same functions as ``/api/v1/api-endpoints`` (:mod:`admin_api.api_endpoints`), so
they validate, encrypt and audit the same way. Password, token and key fields are never filled in
when a page is shown: leaving them empty on the edit form keeps the stored credentials.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from admin_api.api_endpoints import (
    AUTH_TYPES,
    DEFAULT_API_KEY_HEADER,
    MAX_CREDENTIAL_LENGTH,
    MAX_RETRIES,
    MAX_TIMEOUT_SECONDS,
    MIN_TIMEOUT_SECONDS,
    EndpointIn,
    EndpointOut,
    EndpointUpdate,
    check_connection,
    create_endpoint,
    delete_endpoint,
    get_endpoint,
    list_endpoints,
    update_endpoint,
)
from admin_api.audit import record_event
from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import ApiError, _describe_validation, invalid
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 50
_NOTICES = {
    "created": "已新建外部接口 {}。",
    "updated": "已保存外部接口 {} 的修改。",
    "deleted": "已删除外部接口 {}。",
}
_EMPTY_FORM = {"auth_type": "none", "timeout_seconds": "10", "retries": "0", "enabled": True,
               "api_key_header": DEFAULT_API_KEY_HEADER}


def _credentials(auth_type: str, username: str, secret: str) -> dict[str, str] | None:
    """Turn the two credential inputs of the form into the credentials object of ``auth_type``; None when empty."""
    if not secret and not username:
        return None
    if auth_type == "basic":
        return {"username": username, "password": secret}
    if auth_type == "bearer":
        return {"token": secret}
    if auth_type == "api_key":
        return {"key": secret}
    return {"secret": secret}  # rejected by the validation: "none" takes no credentials


def _number(value: str) -> int | str:
    """Return the form value as an int, or unchanged so the model validation names the bad value."""
    value = value.strip()
    return int(value) if value.isdigit() else value


def _validation_error(error: ValidationError) -> ApiError:
    return invalid("INVALID_REQUEST", _describe_validation(RequestValidationError(error.errors())))


def _list_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None, notice: str | None = None, form: dict[str, Any] | None = None,
               offset: int = 0) -> Response:
    listing = list_endpoints(session, offset, PAGE_SIZE)
    if notice is None and error is None:
        done, name = request.query_params.get("done", ""), request.query_params.get("name", "")
        if done in _NOTICES and name.replace("_", "").isalnum():
            notice = _NOTICES[done].format(name)
    return _page(request, "api_endpoints.html", caller, status_code=status_code, listing=listing, error=error,
                 notice=notice, form=form or dict(_EMPTY_FORM), auth_types=AUTH_TYPES, editing=None, limits=_limits(),
                 test_result=None)


def _limits() -> dict[str, int]:
    return {"timeout_min": MIN_TIMEOUT_SECONDS, "timeout_max": MAX_TIMEOUT_SECONDS, "retries_max": MAX_RETRIES,
            "secret_max": MAX_CREDENTIAL_LENGTH}


@router.get("/api-endpoints", response_class=HTMLResponse)
def endpoints_page(request: Request, session: Session = Depends(get_session),
                   caller: Principal = Depends(require("api_endpoints.read", console=True))) -> Response:
    """List endpoints; system administrators also get the create, edit, test and delete forms."""
    return _list_page(request, session, caller)


@router.post("/api-endpoints", response_class=HTMLResponse)
def create_form(
    request: Request,
    name: str = Form(default="", max_length=200),
    display_name: str = Form(default="", max_length=200),
    base_url: str = Form(default="", max_length=1000),
    auth_type: str = Form(default="none", max_length=16),
    api_key_header: str = Form(default="", max_length=200),
    username: str = Form(default="", max_length=MAX_CREDENTIAL_LENGTH),
    secret: str = Form(default="", max_length=MAX_CREDENTIAL_LENGTH),
    timeout_seconds: str = Form(default="10", max_length=10),
    retries: str = Form(default="0", max_length=10),
    enabled: str = Form(default="", max_length=10),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("api_endpoints.write", console=True)),
) -> Response:
    """Create an endpoint with the same checks as POST /api/v1/api-endpoints."""
    _check_csrf(request, caller, "api_endpoints.write", csrf)
    form = {"name": name, "display_name": display_name, "base_url": base_url, "auth_type": auth_type,
            "api_key_header": api_key_header, "username": username, "timeout_seconds": timeout_seconds,
            "retries": retries, "enabled": bool(enabled)}
    try:
        try:
            body = EndpointIn(
                name=name.strip(), display_name=display_name, base_url=base_url, auth_type=auth_type,
                api_key_header=api_key_header or None, credentials=_credentials(auth_type, username.strip(), secret),
                timeout_seconds=_number(timeout_seconds),
                retries=_number(retries), enabled=bool(enabled),
            )
        except ValidationError as error:
            failure = _validation_error(error)
            record_event(request, caller, "api_endpoints.create", f"api_endpoint:{name[:64]}", "failed",
                         {"code": failure.code})
            raise failure from None
        create_endpoint(session, request, caller, body)
    except RegsandboxError as error:
        session.rollback()
        return _list_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    return RedirectResponse(f"/console/api-endpoints?done=created&name={quote(body.name)}", status_code=303)


def _edit_page(request: Request, session: Session, caller: Principal, name: str, *, status_code: int = 200,
               error: str | None = None, test_result: Any = None) -> Response:
    row = EndpointOut.of(get_endpoint(session, name))
    return _page(request, "api_endpoints.html", caller, status_code=status_code, listing=None, error=error,
                 notice=None, form=None, auth_types=AUTH_TYPES, editing=row, limits=_limits(), test_result=test_result)


@router.get("/api-endpoints/{name}", response_class=HTMLResponse)
def edit_page(name: str, request: Request, session: Session = Depends(get_session),
              caller: Principal = Depends(require("api_endpoints.read", console=True))) -> Response:
    """Show one endpoint; system administrators get the edit, test and delete forms."""
    return _edit_page(request, session, caller, name)


@router.post("/api-endpoints/{name}", response_class=HTMLResponse)
def update_form(
    name: str,
    request: Request,
    display_name: str = Form(default="", max_length=200),
    base_url: str = Form(default="", max_length=1000),
    auth_type: str = Form(default="none", max_length=16),
    api_key_header: str = Form(default="", max_length=200),
    username: str = Form(default="", max_length=MAX_CREDENTIAL_LENGTH),
    secret: str = Form(default="", max_length=MAX_CREDENTIAL_LENGTH),
    timeout_seconds: str = Form(default="10", max_length=10),
    retries: str = Form(default="0", max_length=10),
    enabled: str = Form(default="", max_length=10),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("api_endpoints.write", console=True)),
) -> Response:
    """Save the edit form; empty credential inputs keep the stored credentials."""
    _check_csrf(request, caller, "api_endpoints.write", csrf)
    try:
        try:
            body = EndpointUpdate(
                display_name=display_name, base_url=base_url, auth_type=auth_type,
                api_key_header=api_key_header or None,
                credentials=_credentials(auth_type, username.strip(), secret),
                timeout_seconds=_number(timeout_seconds),
                retries=_number(retries), enabled=bool(enabled),
            )
        except ValidationError as error:
            failure = _validation_error(error)
            record_event(request, caller, "api_endpoints.update", f"api_endpoint:{name[:64]}", "failed",
                         {"code": failure.code})
            raise failure from None
        update_endpoint(session, request, caller, name, body)
    except RegsandboxError as error:
        session.rollback()
        if error.code == "API_ENDPOINT_NOT_FOUND":
            raise
        return _edit_page(request, session, caller, name, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/api-endpoints?done=updated&name={quote(name)}", status_code=303)


@router.post("/api-endpoints/{name}/test", response_class=HTMLResponse)
def test_form(
    name: str,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("api_endpoints.write", console=True)),
) -> Response:
    """Run the test connection and show its result on the endpoint's page."""
    _check_csrf(request, caller, "api_endpoints.write", csrf)
    try:
        result = check_connection(session, request, caller, name)
    except RegsandboxError as error:
        if error.code == "API_ENDPOINT_NOT_FOUND":
            raise
        return _edit_page(request, session, caller, name, status_code=error.status, error=error.message)
    return _edit_page(request, session, caller, name, test_result=result)


@router.post("/api-endpoints/{name}/delete", response_class=HTMLResponse)
def delete_form(
    name: str,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("api_endpoints.write", console=True)),
) -> Response:
    _check_csrf(request, caller, "api_endpoints.write", csrf)
    delete_endpoint(session, request, caller, name)
    return RedirectResponse(f"/console/api-endpoints?done=deleted&name={quote(name)}", status_code=303)
