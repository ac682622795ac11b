"""The console pages 修改密码 and 绑定动态验证码, used without a session.

A user whose password has expired or was issued by an administrator, or whose role requires TOTP
before enrolment, cannot sign in. So these forms take the user name and password like the login
form, with the same pre-login CSRF cookie. They call the same functions as
``POST /api/v1/auth/password`` and ``/api/v1/auth/totp/{enrol,confirm}``: the password change is
checked against the password policy and revokes the user's sessions and tokens, and every
outcome is audited as ``auth.password``, ``auth.totp_enrol`` or ``auth.totp_confirm``.
"""

from __future__ import annotations

import secrets as _random

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from admin_api.audit import record_event
from admin_api.console import LOGIN_CSRF_COOKIE
from admin_api.deps import get_session, require
from admin_api.security import ANONYMOUS_PRINCIPAL, Principal
from admin_api.services import authenticate, user_principal
from admin_api.users import change_own_password, confirm_totp_enrolment, start_totp_enrolment
from regsandbox_core.crypto import constant_time_equal
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)


def _password_form(request: Request, *, error: str | None = None, notice: str | None = None,
                   status_code: int = 200) -> Response:
    settings = request.app.state.settings
    token = _random.token_urlsafe(24)
    response = request.app.state.templates.TemplateResponse(
        request, "password.html",
        {"principal": None, "csrf": token, "error": error, "notice": notice,
         "min_length": settings.password_min_length, "history_size": settings.password_history_size},
        status_code=status_code,
    )
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", path="/console",
                        secure=settings.console_cookies_secure)
    return response


@router.get("/password", response_class=HTMLResponse)
def password_form(request: Request, _caller: Principal = Depends(require("public"))) -> Response:
    """Show the change-password form."""
    return _password_form(request)


@router.post("/password", response_class=HTMLResponse)
def change_password(
    request: Request,
    username: str = Form(default="", max_length=64),
    old_password: str = Form(default="", max_length=1024),
    new_password: str = Form(default="", max_length=1024),
    new_password_confirm: str = Form(default="", max_length=1024),
    totp_code: str = Form(default="", alias="totp", max_length=16),
    csrf_token_field: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> Response:
    """Check the old password and store the new one; every outcome is audited as ``auth.password``."""
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not constant_time_equal(csrf_token_field, expected):
        record_event(request, ANONYMOUS_PRINCIPAL, "auth.password", f"user:{username[:64]}", "denied",
                     {"code": "CSRF_INVALID"})
        return _password_form(request, error="表单已过期，请重新填写。", status_code=403)
    if new_password != new_password_confirm:
        return _password_form(request, error="两次输入的新密码不一致，请重新输入。", status_code=422)
    try:
        user = authenticate(session, request, username.strip(), old_password, action="auth.password",
                            totp_code=totp_code or None, purpose="password")
    except RegsandboxError as error:
        return _password_form(request, error=error.message, status_code=error.status)
    try:
        change_own_password(session, request, user, new_password)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, user_principal(user), "auth.password", f"user:{user.username}", "failed",
                     {"code": error.code})
        return _password_form(request, error=error.message, status_code=error.status)
    return _password_form(request, notice=f"用户 {user.username} 的密码已修改，请用新密码登录。")


def _totp_page(request: Request, *, status_code: int = 200, **context: object) -> Response:
    token = _random.token_urlsafe(24)
    values = {"principal": None, "csrf": token, "error": None, "notice": None, "secret": None, "uri": None,
              "username": "", **context}
    response = request.app.state.templates.TemplateResponse(request, "totp.html", values, status_code=status_code)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", path="/console",
                        secure=request.app.state.settings.console_cookies_secure)
    return response


def _login_csrf_valid(request: Request, submitted: str, action: str, username: str) -> bool:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if expected and constant_time_equal(submitted, expected):
        return True
    record_event(request, ANONYMOUS_PRINCIPAL, action, f"user:{username[:64]}", "denied", {"code": "CSRF_INVALID"})
    return False


@router.get("/totp", response_class=HTMLResponse)
def totp_form(request: Request, _caller: Principal = Depends(require("public"))) -> Response:
    """Show the TOTP enrolment form."""
    return _totp_page(request)


@router.post("/totp/enrol", response_class=HTMLResponse)
def totp_enrol(
    request: Request,
    username: str = Form(default="", max_length=64),
    password: str = Form(default="", max_length=1024),
    csrf_token_field: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> Response:
    """Check the password and show a new secret once, with the form that confirms it."""
    if not _login_csrf_valid(request, csrf_token_field, "auth.totp_enrol", username):
        return _totp_page(request, error="表单已过期，请重新填写。", status_code=403)
    try:
        user = authenticate(session, request, username.strip(), password, action="auth.totp_enrol",
                            purpose="totp_enrol")
    except RegsandboxError as error:
        return _totp_page(request, error=error.message, status_code=error.status)
    try:
        secret, uri = start_totp_enrolment(session, request, user)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, user_principal(user), "auth.totp_enrol", f"user:{user.username}", "failed",
                     {"code": error.code})
        return _totp_page(request, error=error.message, status_code=error.status)
    return _totp_page(request, secret=secret, uri=uri, username=user.username)


@router.post("/totp/confirm", response_class=HTMLResponse)
def totp_confirm(
    request: Request,
    username: str = Form(default="", max_length=64),
    password: str = Form(default="", max_length=1024),
    code: str = Form(default="", max_length=16),
    csrf_token_field: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> Response:
    """Confirm the pending secret with the first code from the authenticator app."""
    if not _login_csrf_valid(request, csrf_token_field, "auth.totp_confirm", username):
        return _totp_page(request, error="表单已过期，请重新填写。", status_code=403)
    try:
        user = authenticate(session, request, username.strip(), password, action="auth.totp_confirm",
                            purpose="totp_enrol")
    except RegsandboxError as error:
        return _totp_page(request, error=error.message, status_code=error.status)
    try:
        confirm_totp_enrolment(session, request, user, code)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, user_principal(user), "auth.totp_confirm", f"user:{user.username}", "failed",
                     {"code": error.code})
        return _totp_page(request, error=f"绑定未完成：{error.message}请重新获取密钥，在应用中删除旧条目后添加新密钥。",
                          status_code=error.status)
    return _totp_page(request, notice=f"用户 {user.username} 已绑定动态验证码，今后登录时请同时填写动态验证码。")
