"""The institution registry API: USCC checks, duplicates, hierarchy, status, search, roles and audit."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from stdnum.cn import uscc as uscc_number

from admin_api.models import AuditEvent, Institution
from admin_api.seed import DEMO_LICENCES, demo_uscc

from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An environment of the module's own, so the institutions these tests add stay out of other modules' lists.

    The import and console test modules import this fixture, so each of them gets its own environment too.
    """
    yield from backend_env(request.param, tmp_path_factory, "institutions")


def make_uscc(seed: int | None = None) -> str:
    """Return a valid USCC with a random (or ``seed``-based) organisation part."""
    number = secrets.randbelow(10**9) if seed is None else seed
    body = f"91310115{number:09d}"
    return body + uscc_number.calc_check_digit(body)


def new_code(prefix: str = "t") -> str:
    return f"{prefix}_{secrets.token_hex(5)}"


def institution_body(**overrides: str) -> dict[str, str]:
    code = new_code()
    body = {"code": code, "name": f"测试银行{code}", "type": "银行", "uscc": make_uscc(),
            "licence_no": " B0001H231000001 ", "contact_name": "王五", "contact_phone": "021-12345678",
            "contact_email": "contact@bank.example"}
    body.update(overrides)
    return body


def create(env: Env, **overrides: str) -> dict:
    response = env.client.post("/api/v1/institutions", headers=env.auth("sysadmin"), json=institution_body(**overrides))
    assert response.status_code == 201, response.text
    return response.json()


def count_institutions(env: Env) -> int:
    with env.db() as session:
        return session.scalar(select(func.count()).select_from(Institution)) or 0


def events(env: Env, request_id: str, action: str) -> list[AuditEvent]:
    return [event for event in audit_events(env, request_id) if event.action == action]


def test_demo_institutions_valid_uscc(env: Env) -> None:
    response = env.client.get("/api/v1/institutions/bank_a", headers=env.auth("reviewer"))

    assert response.status_code == 200
    body = response.json()
    assert body["uscc"] == demo_uscc("bank_a")
    assert uscc_number.is_valid(body["uscc"])
    assert body["is_legal_entity"] is True
    assert body["status"] == "active"
    assert body["status_name"] == "正常"


def test_create_institution_audited(env: Env) -> None:
    request_id = f"inst-{secrets.token_hex(6)}"
    body = institution_body()

    response = env.client.post("/api/v1/institutions", json=body,
                               headers={**env.auth("sysadmin"), "X-Request-ID": request_id})

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["code"] == body["code"]
    assert created["licence_no"] == "B0001H231000001"
    assert created["parent_code"] is None
    stored = events(env, request_id, "institutions.create")
    assert [(event.actor, event.outcome) for event in stored] == [("sysadmin", "success")]
    assert stored[0].resource == f"institution:{body['code']}"


@pytest.mark.parametrize(("value", "fragment"), [
    ("91310115MA1K4A001X", "校验码错误：第 18 位应为 D，实际为 X"),
    ("91310115MA1K4A00", "长度错误：应为 18 位，实际为 16 位"),
    ("91310115MA1K4A001DD", "长度错误：应为 18 位，实际为 19 位"),
    ("A1310115MA1K4A001D", "格式错误"),
    ("91310115MA1K4I001D", "格式错误"),
])
def test_create_invalid_uscc_rejected(env: Env, value: str, fragment: str) -> None:
    before = count_institutions(env)
    request_id = f"inst-{secrets.token_hex(6)}"

    response = env.client.post("/api/v1/institutions", json=institution_body(uscc=value),
                               headers={**env.auth("sysadmin"), "X-Request-ID": request_id})

    assert response.status_code == 422
    assert response.json()["code"] == "INSTITUTION_USCC_INVALID"
    assert value in response.json()["detail"]
    assert fragment in response.json()["detail"]
    assert count_institutions(env) == before
    assert [event.outcome for event in events(env, request_id, "institutions.create")] == ["failed"]


def test_uscc_lowercase_and_spaces_normalised(env: Env) -> None:
    value = make_uscc()
    spaced = f" {value[:8].lower()} {value[8:].lower()} "

    created = create(env, uscc=spaced)

    assert created["uscc"] == value


@pytest.mark.parametrize("field", ["code", "name", "uscc"])
def test_create_duplicate_rejected(env: Env, field: str) -> None:
    existing = {"code": "bank_a", "name": "浦东示范银行甲", "uscc": demo_uscc("bank_a")}[field]
    before = count_institutions(env)

    response = env.client.post("/api/v1/institutions", json=institution_body(**{field: existing}),
                               headers=env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == f"INSTITUTION_{field.upper()}_EXISTS"
    assert existing in response.json()["detail"]
    assert "bank_a" in response.json()["detail"]
    assert count_institutions(env) == before


@pytest.mark.parametrize(("overrides", "code"), [
    ({"type": "银行业"}, "INSTITUTION_TYPE_INVALID"),
    ({"code": "Bank-X"}, "INSTITUTION_CODE_INVALID"),
    ({"code": "export"}, "INSTITUTION_CODE_RESERVED"),
    ({"licence_no": "x" * 33}, "INSTITUTION_LICENCE_TOO_LONG"),
    ({"contact_email": "not-an-address"}, "INSTITUTION_EMAIL_INVALID"),
    ({"contact_phone": "电话"}, "INSTITUTION_PHONE_INVALID"),
    ({"name": "   "}, "INSTITUTION_NAME_MISSING"),
])
def test_create_invalid_field_rejected(env: Env, overrides: dict[str, str], code: str) -> None:
    before = count_institutions(env)

    response = env.client.post("/api/v1/institutions", json=institution_body(**overrides), headers=env.auth("sysadmin"))

    assert response.status_code == 422
    assert response.json()["code"] == code
    assert count_institutions(env) == before


def test_branch_of_legal_entity(env: Env) -> None:
    parent = create(env)

    branch = create(env, parent_code=parent["code"])

    assert branch["parent_code"] == parent["code"]
    assert branch["is_legal_entity"] is False


def test_parent_unknown_rejected(env: Env) -> None:
    response = env.client.post("/api/v1/institutions", json=institution_body(parent_code="no_such_bank"),
                               headers=env.auth("sysadmin"))

    assert response.status_code == 422
    assert response.json()["code"] == "INSTITUTION_PARENT_NOT_FOUND"
    assert "no_such_bank" in response.json()["detail"]


def test_parent_branch_rejected(env: Env) -> None:
    parent = create(env)
    branch = create(env, parent_code=parent["code"])

    response = env.client.post("/api/v1/institutions", json=institution_body(parent_code=branch["code"]),
                               headers=env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "INSTITUTION_PARENT_NOT_LEGAL_ENTITY"


def test_parent_cycle_rejected(env: Env) -> None:
    parent = create(env)
    branch = create(env, parent_code=parent["code"])

    self_parent = env.client.patch(f"/api/v1/institutions/{parent['code']}", json={"parent_code": parent["code"]},
                                   headers=env.auth("sysadmin"))
    loop = env.client.patch(f"/api/v1/institutions/{parent['code']}", json={"parent_code": branch["code"]},
                            headers=env.auth("sysadmin"))

    assert self_parent.status_code == 409
    assert self_parent.json()["code"] == "INSTITUTION_PARENT_CYCLE"
    assert loop.status_code == 409
    assert loop.json()["code"] == "INSTITUTION_PARENT_CYCLE"
    with env.db() as session:
        stored = session.scalars(select(Institution).where(Institution.code == parent["code"])).one()
    assert stored.parent_id is None


def test_legal_entity_with_branches_cannot_become_branch(env: Env) -> None:
    parent = create(env)
    create(env, parent_code=parent["code"])
    other = create(env)

    response = env.client.patch(f"/api/v1/institutions/{parent['code']}", json={"parent_code": other["code"]},
                                headers=env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "INSTITUTION_HAS_BRANCHES"


def test_edit_institution_audited(env: Env) -> None:
    created = create(env)
    request_id = f"inst-{secrets.token_hex(6)}"
    new_uscc = make_uscc()

    response = env.client.patch(
        f"/api/v1/institutions/{created['code']}",
        json={"name": f"改名银行{created['code']}", "uscc": new_uscc, "licence_no": "", "type": "信托"},
        headers={**env.auth("sysadmin"), "X-Request-ID": request_id},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["uscc"], body["licence_no"], body["type"]) == (
        f"改名银行{created['code']}", new_uscc, None, "信托")
    stored = events(env, request_id, "institutions.update")
    assert [event.outcome for event in stored] == ["success"]
    changes = json.loads(stored[0].detail)["changes"]
    assert changes["uscc"] == [created["uscc"], new_uscc]
    assert changes["licence_no"] == ["B0001H231000001", None]


def test_edit_code_rejected(env: Env) -> None:
    created = create(env)

    response = env.client.patch(f"/api/v1/institutions/{created['code']}", json={"code": "renamed"},
                                headers=env.auth("sysadmin"))

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"


def test_edit_duplicate_name_rejected(env: Env) -> None:
    created = create(env)

    response = env.client.patch(f"/api/v1/institutions/{created['code']}", json={"name": "浦东示范银行乙"},
                                headers=env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "INSTITUTION_NAME_EXISTS"


def test_edit_clear_required_rejected(env: Env) -> None:
    created = create(env)

    response = env.client.patch(f"/api/v1/institutions/{created['code']}", json={"uscc": None},
                                headers=env.auth("sysadmin"))

    assert response.status_code == 422
    assert response.json()["code"] == "INSTITUTION_USCC_MISSING"


def test_deactivate_reactivate(env: Env) -> None:
    created = create(env)
    request_id = f"inst-{secrets.token_hex(6)}"
    headers = {**env.auth("sysadmin"), "X-Request-ID": request_id}

    off = env.client.post(f"/api/v1/institutions/{created['code']}/deactivate", headers=headers)
    listed = env.client.get("/api/v1/institutions", params={"q": created["code"], "status": "inactive"},
                            headers=env.auth("sysadmin"))
    on = env.client.post(f"/api/v1/institutions/{created['code']}/reactivate", headers=headers)

    assert (off.status_code, off.json()["status"], off.json()["status_name"]) == (200, "inactive", "停用")
    assert [item["code"] for item in listed.json()] == [created["code"]]
    assert (on.status_code, on.json()["status"]) == (200, "active")
    assert len(events(env, request_id, "institutions.deactivate")) == 1
    assert len(events(env, request_id, "institutions.reactivate")) == 1


def test_deactivate_parent_with_active_branch_rejected(env: Env) -> None:
    parent = create(env)
    create(env, parent_code=parent["code"])

    response = env.client.post(f"/api/v1/institutions/{parent['code']}/deactivate", headers=env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "INSTITUTION_HAS_ACTIVE_BRANCHES"


def test_unknown_institution_404(env: Env) -> None:
    response = env.client.patch("/api/v1/institutions/no_such_bank", json={"name": "某"},
                                headers=env.auth("sysadmin"))

    assert response.status_code == 404
    assert response.json()["code"] == "INSTITUTION_NOT_FOUND"


def test_list_search_and_paging(env: Env) -> None:
    marker = secrets.token_hex(3)
    created = [create(env, name=f"检索银行{marker}{index}", type="期货") for index in range(5)]
    codes = sorted(item["code"] for item in created)

    first = env.client.get("/api/v1/institutions", params={"q": f"检索银行{marker}", "limit": 2},
                           headers=env.auth("sysadmin"))
    second = env.client.get("/api/v1/institutions", params={"q": f"检索银行{marker}", "limit": 2, "offset": 2},
                            headers=env.auth("sysadmin"))
    by_uscc = env.client.get("/api/v1/institutions", params={"q": created[0]["uscc"][4:14].lower()},
                             headers=env.auth("sysadmin"))
    by_type = env.client.get("/api/v1/institutions", params={"q": marker, "type": "银行"},
                             headers=env.auth("sysadmin"))

    assert first.headers["X-Total-Count"] == "5"
    assert [item["code"] for item in first.json()] == codes[:2]
    assert [item["code"] for item in second.json()] == codes[2:4]
    assert created[0]["code"] in [item["code"] for item in by_uscc.json()]
    assert by_type.json() == []


def test_list_wildcards_literal(env: Env) -> None:
    response = env.client.get("/api/v1/institutions", params={"q": "%"}, headers=env.auth("sysadmin"))

    assert response.status_code == 200
    assert response.json() == []


def test_list_invalid_type_chinese(env: Env) -> None:
    response = env.client.get("/api/v1/institutions", params={"type": "bank"}, headers=env.auth("sysadmin"))

    assert response.status_code == 422
    assert "只能是" in response.json()["detail"]


@pytest.mark.parametrize("username", ["modeller_a", "reporter_a"])
def test_institution_user_sees_own_only(env: Env, username: str) -> None:
    listed = env.client.get("/api/v1/institutions", params={"limit": 500}, headers=env.auth(username))
    own = env.client.get("/api/v1/institutions/bank_a", headers=env.auth(username))

    assert [item["code"] for item in listed.json()] == ["bank_a"]
    assert listed.headers["X-Total-Count"] == "1"
    assert own.status_code == 200


@pytest.mark.parametrize("username", ["modeller_a", "reporter_a"])
def test_institution_user_other_forbidden(env: Env, username: str) -> None:
    request_id = f"inst-{secrets.token_hex(6)}"

    response = env.client.get("/api/v1/institutions/bank_b", headers={**env.auth(username), "X-Request-ID": request_id})

    assert response.status_code == 403
    assert response.json()["code"] == "INSTITUTION_FORBIDDEN"
    denials = [event for event in audit_events(env, request_id) if event.outcome == "denied"]
    assert [(event.actor, event.action) for event in denials] == [(username, "institutions.read")]


WRITES = [
    ("POST", "/api/v1/institutions", {"json": {"code": "denied_x", "name": "拒绝", "type": "银行",
                                               "uscc": "91310115MA1K4A001D"}}),
    ("PATCH", "/api/v1/institutions/bank_a", {"json": {"name": "改名"}}),
    ("POST", "/api/v1/institutions/bank_a/deactivate", {}),
    ("POST", "/api/v1/institutions/bank_a/reactivate", {}),
    ("POST", "/api/v1/institutions/import", {"files": {"file": ("a.csv", "机构代码,机构名称,统一社会信用代码,机构类型\n".encode())}}),
    ("GET", "/api/v1/institutions/import/template", {}),
]


@pytest.mark.parametrize("username", ["reporter_a", "modeller_a", "secadmin", "auditor", "reviewer"])
@pytest.mark.parametrize(("method", "path", "extra"), WRITES, ids=[f"{m} {p}" for m, p, _e in WRITES])
def test_write_routes_forbidden(env: Env, username: str, method: str, path: str, extra: dict) -> None:
    request_id = f"inst-{secrets.token_hex(6)}"
    before = count_institutions(env)

    response = env.client.request(method, path, headers={**env.auth(username), "X-Request-ID": request_id}, **extra)

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert "新建、修改、停用或导入机构" in response.json()["detail"]
    denials = [event for event in audit_events(env, request_id) if event.outcome == "denied"]
    assert [(event.actor, event.action) for event in denials] == [(username, "institutions.write")]
    assert count_institutions(env) == before


def test_write_anonymous_401(env: Env) -> None:
    response = env.client.post("/api/v1/institutions", json=institution_body())

    assert response.status_code == 401


def test_seed_fills_missing_registry_numbers(env: Env) -> None:
    from admin_api.seed import seed_demo

    with env.db() as session:
        stored = session.scalars(select(Institution).where(Institution.code == "bank_c")).one()
        stored.uscc = stored.licence_no = None
        session.commit()
    with env.db() as session:
        seed_demo(session, env.settings, env.project_root)
    with env.db() as session:
        restored = session.execute(
            select(Institution.uscc, Institution.licence_no).where(Institution.code == "bank_c")).one()

    assert tuple(restored) == (demo_uscc("bank_c"), DEMO_LICENCES["bank_c"])
