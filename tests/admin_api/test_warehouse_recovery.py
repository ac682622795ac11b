"""A reviewer's accept killed between the warehouse rename and the commit, settled at the next start."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import admin_api.app as app_module
import admin_api.submissions as submissions_module
from admin_api.app import create_app
from admin_api.warehouse_recovery import recover_warehouse
from intake.warehouse import LoadOutcome, read_manifest

from .conftest import Env
from .test_submissions import bank_a_licence  # noqa: F401  # module fixture: bank_a gets the test files' 金融许可证号
from .test_submissions import LOANS, accept, loan_row, partition_of, upload_batch, upload_loans, warehouse_rows

PERIOD = "20251031"


def test_interrupted_accept_is_rolled_back_at_start(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_batch(env, PERIOD)
    first = upload_loans(env, PERIOD, [loan_row(1, PERIOD)])
    assert accept(env, first["id"]).status_code == 200
    second = upload_loans(env, PERIOD, [loan_row(2, PERIOD)])
    folder = partition_of(env, LOANS, PERIOD).parent

    def killed(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("process killed before the commit")

    with monkeypatch.context() as patch:  # The partition is replaced, then the process dies: no undo, no commit.
        patch.setattr(LoadOutcome, "undo", lambda self: None)
        patch.setattr(submissions_module, "post_message", killed)
        with pytest.raises(RuntimeError):
            accept(env, second["id"])
    assert read_manifest(folder).submission_id == second["id"]
    assert [path.name for path in folder.glob(".*.previous")]

    assert recover_warehouse(env.session_factory, env.settings) == 1

    assert read_manifest(folder).submission_id == first["id"]
    assert [row["JJH"] for row in warehouse_rows(env, LOANS, PERIOD)] == ["JJ000001"]
    assert not list(folder.glob(".*.previous"))
    assert recover_warehouse(env.session_factory, env.settings) == 0
    detail = env.client.get(f"/api/v1/submissions/{second['id']}", headers=env.auth("reviewer")).json()
    assert detail["state"] == "pending_review"


def test_start_up_settles_the_warehouse(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(app_module, "recover_warehouse", lambda factory, settings: calls.append(settings))

    with TestClient(create_app(env.settings, registry=env.registry, project_root=env.project_root)):
        assert calls == [env.settings]
