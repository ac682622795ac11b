"""Model listing and review: decisions stored, audited and tagged; denials and outages change nothing."""

from __future__ import annotations

from sqlalchemy import func, select

from admin_api.models import ModelReview
from admin_api.security import Principal
from admin_api.services import visible_models

from .conftest import Env
from .helpers import audit_events


def _reviews(env: Env, name: str, version: str) -> list[ModelReview]:
    with env.db() as session:
        return list(session.scalars(
            select(ModelReview).where(ModelReview.model_name == name, ModelReview.model_version == version)
            .order_by(ModelReview.id)
        ))


def _review_count(env: Env) -> int:
    with env.db() as session:
        return session.scalar(select(func.count()).select_from(ModelReview)) or 0


def test_models_list_all_institutions(env: Env) -> None:
    response = env.client.get("/api/v1/models", headers=env.auth("reviewer"))

    items = {(item["name"], item["version"]): item for item in response.json()}
    assert response.status_code == 200
    assert {code for code in (i["institution_code"] for i in items.values())} == {"bank_a", "bank_b", "bank_c", None}
    first = items[("bank_a.scorecard", "1")]
    assert first["institution_name"] == "浦东示范银行甲"
    assert (first["auc"], first["ks"]) == (0.7812, 0.4123)
    assert items[("scratch_model", "1")]["institution_name"] == "未归属"


def test_modeller_of_bank_a_never_sees_bank_b(env: Env) -> None:
    env.registry.add("bank_b.secret_pd", "7", auc=0.8, ks=0.5)
    env.registry.add("bank_ab.lookalike", "1", auc=0.6, ks=0.2)
    try:
        own = env.client.get("/api/v1/models", headers=env.auth("modeller_a"))
        other = env.client.get("/api/v1/models", headers=env.auth("modeller_b"))
    finally:
        del env.registry.versions[("bank_b.secret_pd", "7")]
        del env.registry.versions[("bank_ab.lookalike", "1")]

    assert own.status_code == 200
    assert sorted((item["name"], item["version"]) for item in own.json()) == [
        ("bank_a.scorecard", "1"), ("bank_a.scorecard", "2")]
    assert {item["institution_code"] for item in own.json()} == {"bank_a"}
    assert "bank_b" not in own.text
    assert sorted((item["name"], item["version"]) for item in other.json()) == [
        ("bank_b.pd_model", "1"), ("bank_b.secret_pd", "7")]


def test_models_list_refused_to_reporter(env: Env) -> None:
    response = env.client.get("/api/v1/models", headers=env.auth("reporter_a"))

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


def test_visible_models_fail_closed() -> None:
    items = [{"name": "bank_a.x", "institution_code": "bank_a"}, {"name": "scratch", "institution_code": None}]

    assert visible_models(items, Principal("user", "m", "modeller", None)) == []
    assert visible_models(items, Principal("user", "u", "unknown_role", "bank_a")) == [items[0]]
    assert visible_models(items, Principal("user", "r", "regulator_reviewer")) == items
    assert visible_models(items, Principal("anonymous", "anonymous", "anonymous")) == []


def test_review_approve_stored_tagged_audited(env: Env) -> None:
    response = env.client.post(
        "/api/v1/models/bank_b.pd_model/versions/1/review",
        headers={**env.auth("reviewer"), "X-Request-ID": f"review-approve-{env.backend}"},
        json={"decision": "approved", "comment": "区分能力满足要求"},
    )

    assert response.status_code == 200, response.text
    assert response.json()["decision"] == "approved"
    stored = _reviews(env, "bank_b.pd_model", "1")[-1]
    assert (stored.decision, stored.institution_code, stored.reviewer) == ("approved", "bank_b", "reviewer")
    tags = env.registry.versions[("bank_b.pd_model", "1")]["tags"]
    assert tags["regsandbox.review.status"] == "approved"
    assert tags["regsandbox.review.comment"] == "区分能力满足要求"
    assert tags["regsandbox.review.reviewer"] == "reviewer"
    assert tags["regsandbox.review.decided_at"].startswith(stored.decided_at.isoformat()[:19])
    events = audit_events(env, f"review-approve-{env.backend}")
    assert [(e.action, e.resource, e.outcome) for e in events] == [
        ("models.review", "model:bank_b.pd_model/1", "success")]
    listed = {(i["name"], i["version"]): i for i in env.client.get("/api/v1/models", headers=env.auth("reviewer")).json()}
    assert listed[("bank_b.pd_model", "1")]["review_status"] == "approved"


def test_review_return_needs_comment(env: Env) -> None:
    before = _review_count(env)

    response = env.client.post(
        "/api/v1/models/bank_c.lgd/versions/1/review", headers=env.auth("reviewer"),
        json={"decision": "returned", "comment": "   "},
    )

    assert response.status_code == 422
    assert response.json()["code"] == "COMMENT_REQUIRED"
    assert _review_count(env) == before


def test_review_bad_decision(env: Env) -> None:
    response = env.client.post(
        "/api/v1/models/bank_c.lgd/versions/1/review", headers=env.auth("reviewer"),
        json={"decision": "maybe", "comment": "x"},
    )

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_DECISION"
    assert "'maybe'" in response.json()["detail"]


def test_review_unknown_version_404(env: Env) -> None:
    response = env.client.post(
        "/api/v1/models/bank_c.lgd/versions/99/review", headers=env.auth("reviewer"),
        json={"decision": "approved", "comment": ""},
    )

    assert response.status_code == 404
    assert response.json()["code"] == "MODEL_VERSION_NOT_FOUND"


def test_review_unassigned_cannot_approve(env: Env) -> None:
    response = env.client.post(
        "/api/v1/models/scratch_model/versions/1/review", headers=env.auth("reviewer"),
        json={"decision": "approved", "comment": ""},
    )

    assert response.status_code == 409
    assert response.json()["code"] == "MODEL_UNASSIGNED"
    assert "regsandbox.review.status" not in env.registry.versions[("scratch_model", "1")]["tags"]


def test_review_by_modeller_changes_nothing(env: Env) -> None:
    before = _review_count(env)
    tags_before = dict(env.registry.versions[("bank_a.scorecard", "2")]["tags"])

    response = env.client.post(
        "/api/v1/models/bank_a.scorecard/versions/2/review",
        headers={**env.auth("modeller_a"), "X-Request-ID": f"modeller-review-{env.backend}"},
        json={"decision": "approved", "comment": "自己批准"},
    )

    assert response.status_code == 403
    assert "建模人员" in response.json()["detail"]
    assert _review_count(env) == before
    assert env.registry.versions[("bank_a.scorecard", "2")]["tags"] == tags_before
    events = audit_events(env, f"modeller-review-{env.backend}")
    assert [(e.actor, e.role, e.institution_code, e.outcome) for e in events] == [
        ("modeller_a", "modeller", "bank_a", "denied")]


def test_registry_down_503_nothing_stored(env: Env) -> None:
    before = _review_count(env)
    env.registry.fail = True
    try:
        listing = env.client.get("/api/v1/models", headers=env.auth("reviewer"))
        review = env.client.post(
            "/api/v1/models/bank_a.scorecard/versions/1/review", headers=env.auth("reviewer"),
            json={"decision": "approved", "comment": ""},
        )
    finally:
        env.registry.fail = False

    assert listing.status_code == 503
    assert listing.json()["code"] == "REGISTRY_UNAVAILABLE"
    assert review.status_code == 503
    assert review.json()["code"] == "REGISTRY_UNAVAILABLE"
    assert _review_count(env) == before


class _TagsFail:
    """Registry that lists versions but fails when tags are written, after the review row was flushed."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def list_model_versions(self):  # type: ignore[no-untyped-def]
        return self.inner.list_model_versions()  # type: ignore[attr-defined]

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        raise TimeoutError("MLflow did not answer")


def test_tag_write_failure_rolls_back(env: Env) -> None:
    app = env.client.app
    original = app.state.registry
    app.state.registry = _TagsFail(original)
    before = _review_count(env)
    try:
        response = env.client.post(
            "/api/v1/models/bank_a.scorecard/versions/1/review", headers=env.auth("reviewer"),
            json={"decision": "approved", "comment": ""},
        )
    finally:
        app.state.registry = original

    assert response.status_code == 503
    assert response.json()["code"] == "REGISTRY_UNAVAILABLE"
    assert _review_count(env) == before


def test_real_adapter_unreachable_503(env: Env) -> None:
    """The default adapter (model_registry.client) against a closed port returns 503 too."""
    from admin_api.registry import MlflowRegistry

    app = env.client.app
    original = app.state.registry
    app.state.registry = MlflowRegistry(env.settings.mlflow_url, env.secrets.mlflow_admin_password)
    try:
        response = env.client.get("/api/v1/models", headers=env.auth("reviewer"))
    finally:
        app.state.registry = original

    assert response.status_code == 503
    assert response.json()["code"] == "REGISTRY_UNAVAILABLE"
