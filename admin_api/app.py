"""Application factory of admin_api.

Run with ``uvicorn admin_api.app:create_server_app --factory --host 127.0.0.1 --port $REGSANDBOX_ADMIN_API_PORT``.
The factory refuses to start (exit with a Chinese message) when the platform secrets are
missing, the master key or key store is unusable, the database is not migrated to the newest
revision, or a shipped report template is invalid.

``app.state`` contains what the routes share: ``settings``, ``secrets``, ``engine``,
``session_factory``, ``keystore`` (use :func:`admin_api.keyaccess.request_keystore` in routes),
``extract_rebuilds`` (the rebuild queue of :mod:`admin_api.extract_rebuilds`), ``registry`` (the MLflow adapter, replaceable in tests), ``project_root``
(folder against which report notebook paths resolve) and ``templates``.
"""

from __future__ import annotations

import gc
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from admin_api import console, console_api_endpoints, console_keys, console_messages, console_users
from admin_api.audit_checkpoint import CheckpointWriter
from admin_api.admission import install_admission
from admin_api.db import make_engine, make_session_factory
from admin_api.deps import require
from admin_api.display import install_filters
from admin_api.errors import install_error_handlers, not_found
from admin_api.keyaccess import open_platform_keystore
from admin_api.limits import MAX_BODY_BYTES, ChineseTooLarge
from admin_api.migrate import current_revision, head_revision
from admin_api.registry import MlflowRegistry, ModelRegistry
from admin_api.routes import api_endpoints, audit_log, identity, keys, messages, models, reports, submissions, tokens, users
from admin_api.routes import tasks as task_routes
from admin_api.routes import report_data as report_data_routes
from admin_api.routes import templates as template_routes
from admin_api import console_report_data
from admin_api import console_templates
from admin_api.report_templates import configure_templates
from admin_api.routes import catalog as catalog_routes
from admin_api.routes import extracts as extract_routes
from admin_api.routes import institutions as institution_routes
from admin_api.routes import roles as role_routes
from admin_api import console_institutions
from admin_api import console_roles, console_user_admin
from admin_api import console_me
from admin_api import console_tasks, console_workbench
from admin_api import console_submissions
from admin_api import console_catalog, console_extracts
from admin_api import console_data_quality, console_reidentification
from admin_api.extract_rebuilds import RebuildQueue
from admin_api.routes import data_quality as data_quality_routes
from admin_api.routes import reidentification as reidentification_routes
from admin_api.security import Principal, configure_password_hashing
from admin_api.tasks import ReminderSender
from admin_api.warehouse_recovery import recover_warehouse
from admin_api.catalog_sync import sync_at_start
from admin_api.submissions import catalog as template_catalog
from regsandbox_core.errors import ConfigurationError
from regsandbox_core.secrets import load_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
try:
    import swagger_ui_bundle
except ImportError:  # the package is a dependency; without it only /api/docs is unavailable
    SWAGGER_UI_DIR: Path | None = None
else:
    SWAGGER_UI_DIR = Path(str(swagger_ui_bundle.swagger_ui_path))
"""Swagger UI files of the swagger-ui-bundle-v2 package, so /api/docs needs no CDN."""
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _check_database(engine: Engine) -> None:
    try:
        revision = current_revision(engine)
    except SQLAlchemyError as error:
        raise ConfigurationError(
            "DATABASE_UNAVAILABLE",
            f"无法连接管理数据库 {engine.url.render_as_string(hide_password=True)}（{type(error).__name__}），"
            "请检查 REGSANDBOX_DATABASE_URL 与数据库服务。",
        ) from error
    if revision != head_revision():
        raise ConfigurationError(
            "DATABASE_NOT_MIGRATED",
            f"管理数据库版本为 {revision or '空'}，需要 {head_revision()}。请先运行 `python -m admin_api.manage migrate`。",
        )


class RequestIdMiddleware:
    """ASGI middleware that gives every request an id (the caller's valid X-Request-ID, else a new one) and echoes it.

    It is a plain ASGI class rather than ``app.middleware("http")``, because Starlette's
    BaseHTTPMiddleware runs each request in an extra task with memory streams of its own.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        echoed = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), echoed]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /api/docs from the installed files; the page loads nothing from other hosts."""

    @app.get("/api/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(_caller: Principal = Depends(require("public"))) -> HTMLResponse:
        if SWAGGER_UI_DIR is None:
            logger.warning("swagger-ui-bundle-v2 is not installed, /api/docs shows the JSON link only")
            return HTMLResponse(
                "<!doctype html><meta charset=\"utf-8\"><title>接口文档</title>"
                "<p>本机未安装接口文档界面（Python 包 swagger-ui-bundle-v2）。"
                "接口说明见 <a href=\"/api/openapi.json\">/api/openapi.json</a>。</p>"
            )
        return get_swagger_ui_html(
            openapi_url="/api/openapi.json",
            title="监管沙箱管理服务接口文档",
            swagger_js_url="/api/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/api/docs/assets/swagger-ui.css",
            swagger_favicon_url="/api/docs/assets/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/api/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str, _caller: Principal = Depends(require("public"))) -> FileResponse:
        if name not in DOCS_ASSETS or SWAGGER_UI_DIR is None:
            raise not_found("NOT_FOUND", f"接口文档没有文件 {name}。")
        return FileResponse(SWAGGER_UI_DIR / name, media_type=DOCS_ASSETS[name])


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Settle interrupted warehouse loads and sync the data catalog, then run the checkpoint writer and reminders.

    In a server process (:func:`create_server_app`), the objects that live as long as the process
    (modules, routes, models, compiled statements) are moved out of the garbage collector's
    generations with ``gc.freeze()`` before serving. Otherwise every full collection walks them all
    while holding the GIL: about 90 ms with this application loaded, a pause that every request in
    flight waits for. Tests build many applications in one process, whose cyclic garbage a freeze
    would keep for good, so :func:`create_app` does not freeze.
    """
    settings = app.state.settings
    recover_warehouse(app.state.session_factory, settings)
    with app.state.session_factory() as session:
        sync_at_start(session, settings, app.state.keystore, template_catalog())
    writer = CheckpointWriter(app.state.session_factory, settings, app.state.keystore,
                              settings.audit_checkpoint_minutes * 60)
    writer.start()
    reminders = ReminderSender(app.state.session_factory, settings.task_reminder_minutes * 60)
    reminders.start()
    if app.state.freeze_gc:
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        reminders.stop()
        writer.stop()
        app.state.extract_rebuilds.stop()


class _AdminApp(FastAPI):
    """FastAPI with :class:`ChineseTooLarge` outside every middleware, where the body limit's plain-text 413 passes."""

    def build_middleware_stack(self) -> ASGIApp:
        return ChineseTooLarge(super().build_middleware_stack())


def install_routes(app: FastAPI) -> None:
    """Add every API route, console page and the documentation pages to ``app``."""
    for module in (identity, audit_log, models, reports, keys, api_endpoints, messages, users, tokens,
                   institution_routes, role_routes, submissions, task_routes, report_data_routes, template_routes,
                   catalog_routes, extract_routes, reidentification_routes, data_quality_routes):
        app.include_router(module.router, prefix="/api/v1")
    for page_module in (console, console_keys, console_users, console_institutions, console_api_endpoints,
                        console_messages, console_user_admin, console_roles, console_me, console_tasks, console_workbench,
                        console_report_data, console_templates, console_submissions, console_catalog,
                        console_extracts, console_reidentification, console_data_quality):
        app.include_router(page_module.router)
    _add_docs(app)

    @app.get("/healthz", include_in_schema=False)
    def health(_caller: Principal = Depends(require("public"))) -> dict[str, str]:
        return {"status": "ok"}


def build_routes_only() -> FastAPI:
    """Return an application with every route and no state, for generating docs/permissions.md."""
    app = FastAPI(title="regsandbox admin_api", version="1", docs_url=None, openapi_url=None, redoc_url=None)
    install_routes(app)
    return app


def create_app(
    settings: Settings | None = None,
    *,
    registry: ModelRegistry | None = None,
    project_root: Path | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the admin_api application.

    ``registry`` replaces the MLflow adapter and ``project_root`` the folder that report
    notebook paths are relative to (default: the checkout). ``freeze_gc`` freezes the garbage
    collector's view of the loaded objects at start-up (see ``_lifespan``). Raises SystemExit with a Chinese
    message when the secrets or the database are not ready.
    """
    settings = settings or get_settings()
    try:
        secrets = load_platform_secrets(settings)
        keystore = open_platform_keystore(settings)
        engine = make_engine(settings.sqlalchemy_url)
        _check_database(engine)
        configure_templates(settings)
    except ConfigurationError as error:
        logger.error("admin_api cannot start: %s", error.code)
        raise SystemExit(f"admin_api 无法启动：{error.message}") from error

    configure_password_hashing(settings)
    app = _AdminApp(title="regsandbox admin_api", version="1", docs_url=None, openapi_url="/api/openapi.json",
                    redoc_url=None, max_body_size=MAX_BODY_BYTES, lifespan=_lifespan)
    app.state.settings = settings
    app.state.freeze_gc = freeze_gc
    app.state.secrets = secrets
    app.state.keystore = keystore
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.extract_rebuilds = RebuildQueue(app.state.session_factory, settings, keystore)
    app.state.registry = registry or MlflowRegistry(settings.mlflow_url, secrets.mlflow_admin_password)
    app.state.project_root = (project_root or PROJECT_ROOT).resolve()
    app.state.templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    install_filters(app.state.templates)

    app.add_middleware(RequestIdMiddleware)
    install_admission(app)  # after every other middleware, so that it runs first
    install_error_handlers(app)
    install_routes(app)
    console_messages.install_unread_badge(app.state.templates)

    logger.info("admin_api ready, database %s", engine.url.render_as_string(hide_password=True))
    return app


def create_server_app() -> FastAPI:
    """Build the application of the admin_api server process: ``uvicorn admin_api.app:create_server_app --factory``."""
    return create_app(freeze_gc=True)
