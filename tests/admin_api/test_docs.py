"""The API documentation works offline, and the OpenAPI document declares the bearer scheme."""

from __future__ import annotations

import re

from .conftest import Env

_URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")


def test_docs_page_references_no_external_host(env: Env) -> None:
    response = env.client.get("/api/docs")

    assert response.status_code == 200
    assert 'src="/api/docs/assets/swagger-ui-bundle.js"' in response.text
    assert 'href="/api/docs/assets/swagger-ui.css"' in response.text
    external = [url for url in _URL.findall(response.text)
                if not re.match(r"(?:https?:)?//127\.0\.0\.1(?::\d+)?(?:/|$)", url)]
    assert external == []


def test_docs_assets_served_locally(env: Env) -> None:
    script = env.client.get("/api/docs/assets/swagger-ui-bundle.js")
    style = env.client.get("/api/docs/assets/swagger-ui.css")
    icon = env.client.get("/api/docs/assets/favicon-32x32.png")

    assert script.status_code == 200
    assert "SwaggerUIBundle" in script.text
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert icon.status_code == 200
    assert icon.content.startswith(b"\x89PNG")


def test_docs_asset_outside_allow_list_404(env: Env) -> None:
    for name in ("index.html", "swagger-initializer.js", "..%2F__init__.py"):
        response = env.client.get(f"/api/docs/assets/{name}")
        assert response.status_code == 404
        assert response.json()["code"] == "NOT_FOUND"


def test_openapi_declares_bearer_scheme(env: Env) -> None:
    spec = env.client.get("/api/openapi.json").json()

    scheme = spec["components"]["securitySchemes"]["BearerToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "/api/v1/auth/token" in scheme["description"]
    assert spec["paths"]["/api/v1/me"]["get"]["security"] == [{"BearerToken": []}]
    assert spec["paths"]["/api/v1/models"]["get"]["security"] == [{"BearerToken": []}]
    assert "security" not in spec["paths"]["/api/v1/auth/token"]["post"]
    assert not any(path.startswith("/console") for path in spec["paths"])


def test_bearer_declaration_keeps_chinese_errors(env: Env) -> None:
    wrong_scheme = env.client.get("/api/v1/me", headers={"Authorization": "Basic abc"})
    missing = env.client.get("/api/v1/me")

    assert wrong_scheme.status_code == 401
    assert wrong_scheme.json()["code"] == "INVALID_TOKEN"
    assert missing.status_code == 401
    assert missing.json()["code"] == "NOT_AUTHENTICATED"
