"""MLflow server configuration, admin client and permission sync against a real MLflow server."""

from __future__ import annotations

import configparser
import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from model_registry.client import MlflowAdmin, RegistryUnavailable
from model_registry.server import prepare_server, wait_until_ready
from model_registry.sync import fetch_users, institution_codes, sync_permissions
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import mlflow_password
from regsandbox_core.settings import Settings
from tests.conftest import free_port
from tests.model_registry.conftest import RunningMlflow


def user(username: str, role: str, institution: str | None, active: bool = True) -> dict[str, Any]:
    return {
        "username": username,
        "role": role,
        "institution_code": institution,
        "is_active": active,
        "email": f"{username}@example.com",
    }


def as_user(server: RunningMlflow, username: str) -> httpx.Client:
    return server.user_client(username, mlflow_password(server.secrets, username))


def experiment_id(server: RunningMlflow, name: str) -> str:
    with server.admin() as admin:
        return admin.get_or_create_experiment(name)


def log_run(client: httpx.Client, experiment: str, metrics: dict[str, float]) -> httpx.Response:
    """Create a run in ``experiment`` and log ``metrics``; return the first failed response or the run."""
    created = client.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment, "start_time": 0})
    if created.status_code != 200:
        return created
    run_id = created.json()["run"]["info"]["run_id"]
    for key, value in metrics.items():
        logged = client.post(
            "/api/2.0/mlflow/runs/log-metric",
            json={"run_id": run_id, "key": key, "value": value, "timestamp": int(time.time() * 1000), "step": 0},
        )
        if logged.status_code != 200:
            return logged
    return created


def register_version(client: httpx.Client, name: str, run: dict[str, Any]) -> httpx.Response:
    """Create the registered model (if needed) and one version of it from ``run``."""
    created = client.post("/api/2.0/mlflow/registered-models/create", json={"name": name})
    if created.status_code not in (200, 400):
        return created
    return client.post(
        "/api/2.0/mlflow/model-versions/create",
        json={"name": name, "source": run["info"]["artifact_uri"] + "/model", "run_id": run["info"]["run_id"]},
    )


# Server configuration


def test_prepare_server_layout(mlflow_server: RunningMlflow) -> None:
    settings = mlflow_server.settings
    argv, env = prepare_server(settings, mlflow_server.secrets)
    mlflow_dir = settings.mlflow_dir

    assert argv[1:4] == ["server", "--app-name", "basic-auth"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(settings.mlflow_port)
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    assert argv[argv.index("--artifacts-destination") + 1] == str(mlflow_dir / "artifacts")
    assert argv[argv.index("--workers") + 1] == "1"
    assert "localhost" in argv[argv.index("--allowed-hosts") + 1].split(",")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == mlflow_server.secrets.mlflow_flask_secret
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == mlflow_server.secrets.mlflow_admin_password
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(mlflow_dir / "basic_auth.ini")

    assert stat.S_IMODE(mlflow_dir.stat().st_mode) == 0o700
    ini_path = mlflow_dir / "basic_auth.ini"
    assert stat.S_IMODE(ini_path.stat().st_mode) == 0o600
    config = configparser.ConfigParser()
    config.read(ini_path)
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert config["mlflow"]["database_uri"] == f"sqlite:///{mlflow_dir / 'basic_auth.db'}"
    assert config["mlflow"]["admin_username"] == "admin"
    assert mlflow_server.secrets.mlflow_admin_password not in ini_path.read_text()
    assert (mlflow_dir / "basic_auth.db").exists()


def test_foreign_host_header_rejected(mlflow_server: RunningMlflow) -> None:
    response = httpx.get(
        f"{mlflow_server.url}/api/2.0/mlflow/experiments/search", headers={"Host": "attacker.example"}, timeout=10
    )

    assert response.status_code == 403


def test_admin_password_from_secrets(mlflow_server: RunningMlflow) -> None:
    wrong = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/users/list", auth=("admin", "wrong-password-123"))
    with mlflow_server.admin() as admin:
        usernames = [row["username"] for row in admin.list_users()]

    assert wrong.status_code == 401
    assert "admin" in usernames


def test_default_permission_is_none(mlflow_server: RunningMlflow) -> None:
    with mlflow_server.admin() as admin:
        admin.create_user("stranger", "stranger-password-1")
        sandbox = admin.get_or_create_experiment("bank_z/sandbox")
    stranger = mlflow_server.user_client("stranger", "stranger-password-1")

    assert stranger.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": "0"}).status_code == 403
    assert stranger.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": sandbox}).status_code == 403
    assert log_run(stranger, sandbox, {"auc": 0.5}).status_code == 403


# Admin client


def test_create_user_idempotent(mlflow_server: RunningMlflow) -> None:
    with mlflow_server.admin() as admin:
        first = admin.create_user("carol", "first-password-1")
        second = admin.create_user("carol", "second-password-2")
        deleted = admin.delete_user("carol")
        deleted_again = admin.delete_user("carol")

    assert first is True
    assert second is False
    assert deleted is True
    assert deleted_again is False


def test_password_update_takes_effect(mlflow_server: RunningMlflow) -> None:
    with mlflow_server.admin() as admin:
        admin.create_user("dave", "first-password-1")
        admin.create_user("dave", "second-password-2")
    old = mlflow_server.user_client("dave", "first-password-1").get("/api/2.0/mlflow/experiments/search", params={"max_results": 10})
    new = mlflow_server.user_client("dave", "second-password-2").get("/api/2.0/mlflow/experiments/search", params={"max_results": 10})

    assert old.status_code == 401
    assert new.status_code == 200


def test_grant_create_then_update(mlflow_server: RunningMlflow) -> None:
    with mlflow_server.admin() as admin:
        admin.create_user("erin", "erin-password-12")
        experiment = admin.get_or_create_experiment("bank_y/grants")
        created = admin.grant_experiment("erin", experiment, "READ")
        unchanged = admin.grant_experiment("erin", experiment, "READ")
        updated = admin.grant_experiment("erin", experiment, "EDIT")
        rows = [row for row in admin.list_user_permissions("erin") if row["resource_pattern"] == experiment]

    assert (created, unchanged, updated) == (True, False, True)
    assert [row["permission"] for row in rows] == ["EDIT"]


def test_unreachable_server_raises() -> None:
    admin = MlflowAdmin(f"http://127.0.0.1:{free_port()}", "admin", "irrelevant-password", timeout=2)

    with pytest.raises(RegistryUnavailable) as caught:
        admin.list_model_versions()

    assert caught.value.code == "REGISTRY_UNAVAILABLE"
    assert caught.value.status == 503
    assert "MLflow" in caught.value.message
    assert "无法访问" in caught.value.message


def test_wait_until_ready_times_out() -> None:
    with pytest.raises(RegsandboxError) as caught:
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout=1)

    assert caught.value.code == "REGISTRY_START_TIMEOUT"


# Permission sync

BANK_USERS = [
    user("a_model", "modeller", "bank_a"),
    user("a_model2", "modeller", "bank_a"),
    user("a_report", "reporter", "bank_a"),
    user("b_model", "modeller", "bank_b"),
    user("reviewer", "regulator_reviewer", None),
    user("sysadmin", "system_admin", None),
]


@pytest.fixture(scope="module")
def banks(mlflow_server: RunningMlflow) -> Iterator[dict[str, Any]]:
    """bank_a and bank_b after one sync, each with a run, a registered model and a second sync."""
    first = sync_permissions(mlflow_server.settings, mlflow_server.secrets, BANK_USERS)
    a_client, b_client = as_user(mlflow_server, "a_model"), as_user(mlflow_server, "b_model")
    a_run = log_run(a_client, first.sandbox_experiments["bank_a"], {"auc": 0.81, "ks": 0.47})
    b_run = log_run(b_client, first.sandbox_experiments["bank_b"], {"auc": 0.7})
    a_version = register_version(a_client, "bank_a.m", a_run.json()["run"])
    b_version = register_version(b_client, "bank_b.m", b_run.json()["run"])
    second = sync_permissions(mlflow_server.settings, mlflow_server.secrets, BANK_USERS)
    yield {
        "first": first,
        "second": second,
        "a_run": a_run,
        "a_version": a_version,
        "b_version": b_version,
        "experiments": first.sandbox_experiments,
    }


def test_sync_creates_users_and_sandboxes(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    with mlflow_server.admin() as admin:
        usernames = {row["username"] for row in admin.list_users()}
        experiment_names = {row["name"] for row in admin.list_experiments()}

    assert banks["first"].users_synced == ["a_model", "a_model2", "b_model", "reviewer"]
    assert {"a_model", "a_model2", "b_model", "reviewer"} <= usernames
    assert "a_report" not in usernames
    assert "sysadmin" not in usernames
    assert {"bank_a/sandbox", "bank_b/sandbox"} <= experiment_names


def test_modeller_writes_own_institution(banks: dict[str, Any]) -> None:
    assert banks["a_run"].status_code == 200
    assert banks["a_version"].status_code == 200, banks["a_version"].text
    assert banks["b_version"].status_code == 200, banks["b_version"].text


def test_sync_grants_colleagues(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    colleague = as_user(mlflow_server, "a_model2")

    model = colleague.get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_a.m"})
    run = log_run(colleague, banks["experiments"]["bank_a"], {"auc": 0.6})

    assert model.status_code == 200
    assert run.status_code == 200


def test_modeller_denied_other_institution(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    a_client = as_user(mlflow_server, "a_model")
    b_experiment = banks["experiments"]["bank_b"]

    experiment = a_client.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": b_experiment})
    model = a_client.get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_b.m"})
    version = a_client.get("/api/2.0/mlflow/model-versions/get", params={"name": "bank_b.m", "version": "1"})
    run = log_run(a_client, b_experiment, {"auc": 0.9})
    search = a_client.get("/api/2.0/mlflow/registered-models/search", params={"max_results": 100})

    assert experiment.status_code == 403
    assert model.status_code == 403
    assert version.status_code == 403
    assert run.status_code == 403
    assert "bank_b.m" not in {row["name"] for row in search.json().get("registered_models", [])}


def test_regulator_reads_all_writes_none(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    reviewer = as_user(mlflow_server, "reviewer")
    a_run_id = banks["a_run"].json()["run"]["info"]["run_id"]

    for code in ("bank_a", "bank_b"):
        response = reviewer.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": banks["experiments"][code]})
        assert response.status_code == 200, code
        model = reviewer.get("/api/2.0/mlflow/registered-models/get", params={"name": f"{code}.m"})
        assert model.status_code == 200, code
    assert reviewer.get("/api/2.0/mlflow/runs/get", params={"run_id": a_run_id}).status_code == 200

    logged = reviewer.post(
        "/api/2.0/mlflow/runs/log-metric",
        json={"run_id": a_run_id, "key": "auc", "value": 1.0, "timestamp": 0, "step": 0},
    )
    new_run = log_run(reviewer, banks["experiments"]["bank_a"], {"auc": 1.0})
    tagged = reviewer.post(
        "/api/2.0/mlflow/model-versions/set-tag", json={"name": "bank_a.m", "version": "1", "key": "k", "value": "v"}
    )
    deleted = reviewer.request("DELETE", "/api/2.0/mlflow/registered-models/delete", json={"name": "bank_b.m"})
    assert logged.status_code == 403
    assert new_run.status_code == 403
    assert tagged.status_code == 403
    assert deleted.status_code == 403


def test_second_sync_changes_nothing(banks: dict[str, Any]) -> None:
    second = banks["second"]
    models = {grant.resource_name for grant in second.grants}

    assert {"bank_a.m", "bank_b.m", "bank_a/sandbox", "bank_b/sandbox"} <= models
    assert [g for g in second.changed_grants if g.resource_type == "experiment"] == []
    assert second.quarantined == []


def test_list_model_versions_has_metrics(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    with mlflow_server.admin() as admin:
        versions = {(row["name"], row["version"]): row for row in admin.list_model_versions()}

    row = versions[("bank_a.m", "1")]
    assert row["run_id"] == banks["a_run"].json()["run"]["info"]["run_id"]
    assert row["metrics"] == {"auc": pytest.approx(0.81), "ks": pytest.approx(0.47)}
    assert row["creation_timestamp"] > 0
    assert isinstance(row["tags"], dict)


def test_set_model_version_tags(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    tags = {"regsandbox.review.status": "approved", "regsandbox.review.reviewer": "reviewer"}

    with mlflow_server.admin() as admin:
        admin.set_model_version_tags("bank_b.m", 1, tags)
        versions = {(row["name"], row["version"]): row for row in admin.list_model_versions()}

    assert versions[("bank_b.m", "1")]["tags"] == tags
    assert versions[("bank_a.m", "1")]["tags"] == {}


def test_inactive_user_removed(mlflow_server: RunningMlflow, banks: dict[str, Any]) -> None:
    users = [dict(row) for row in BANK_USERS]
    users[1]["is_active"] = False

    report = sync_permissions(mlflow_server.settings, mlflow_server.secrets, users)
    response = as_user(mlflow_server, "a_model2").get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_a.m"})
    sync_permissions(mlflow_server.settings, mlflow_server.secrets, BANK_USERS)

    assert report.users_removed == ["a_model2"]
    assert response.status_code == 401


# Quarantine

QUARANTINE_USERS = [
    user("q_model", "modeller", "bank_q"),
    user("r_model", "modeller", "bank_r"),
    user("q_reviewer", "regulator_reviewer", None),
]


def test_foreign_object_quarantined(mlflow_server: RunningMlflow) -> None:
    settings, secrets = mlflow_server.settings, mlflow_server.secrets
    sync_permissions(settings, secrets, QUARANTINE_USERS)
    q_client, r_client = as_user(mlflow_server, "q_model"), as_user(mlflow_server, "r_model")

    # A modeller of bank_q creates objects in bank_r's namespace.
    created_model = q_client.post("/api/2.0/mlflow/registered-models/create", json={"name": "bank_r.planted"})
    created_experiment = q_client.post("/api/2.0/mlflow/experiments/create", json={"name": "bank_r/planted"})
    planted_experiment = created_experiment.json()["experiment_id"]
    report = sync_permissions(settings, secrets, QUARANTINE_USERS)

    assert created_model.status_code == 200
    assert {obj.name for obj in report.quarantined} == {"bank_r.planted", "bank_r/planted"}
    assert [g for g in report.grants if "planted" in g.resource_name] == []
    model = r_client.get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_r.planted"})
    assert model.status_code == 403
    experiment = r_client.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": planted_experiment})
    assert experiment.status_code == 403
    state = json.loads((settings.mlflow_dir / "sync_state.json").read_text())
    assert "registered_model:bank_r.planted" in state["quarantined"]

    # The quarantine stays after the planting user is deleted.
    without_q = [row for row in QUARANTINE_USERS if row["username"] != "q_model"]
    without_q.append(user("q_model", "modeller", "bank_q", active=False))
    later = sync_permissions(settings, secrets, without_q)
    assert {obj.name for obj in later.quarantined} == {"bank_r.planted", "bank_r/planted"}
    model = r_client.get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_r.planted"})
    assert model.status_code == 403
    sync_permissions(settings, secrets, QUARANTINE_USERS)


def test_outsider_grant_on_adopted_revoked(mlflow_server: RunningMlflow) -> None:
    settings, secrets = mlflow_server.settings, mlflow_server.secrets
    sync_permissions(settings, secrets, QUARANTINE_USERS)
    q_client, r_client = as_user(mlflow_server, "q_model"), as_user(mlflow_server, "r_model")
    q_client.post("/api/2.0/mlflow/registered-models/create", json={"name": "bank_q.shared"})
    sync_permissions(settings, secrets, QUARANTINE_USERS)

    # A modeller with MANAGE passes the model on to another institution.
    shared = q_client.post(
        "/api/3.0/mlflow/users/permissions/grant",
        json={"username": "r_model", "resource_type": "registered_model", "resource_id": "bank_q.shared", "permission": "READ"},
    )
    leaked = r_client.get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_q.shared"})
    report = sync_permissions(settings, secrets, QUARANTINE_USERS)
    after = r_client.get("/api/2.0/mlflow/registered-models/get", params={"name": "bank_q.shared"})

    assert shared.status_code == 200
    assert leaked.status_code == 200
    assert [(name, obj.name) for name, obj in report.revoked] == [("r_model", "bank_q.shared")]
    assert after.status_code == 403


def test_institution_codes_filtered() -> None:
    users = [
        user("m1", "modeller", "bank_a"),
        user("r1", "reporter", "bank_c"),
        user("m2", "modeller", "Bank/../x"),
        user("reg", "regulator_reviewer", "regulator"),
    ]

    assert institution_codes(users) == {"bank_a", "bank_c"}


def test_corrupt_state_stops_sync(mlflow_server: RunningMlflow, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, mlflow_port=mlflow_server.settings.mlflow_port)
    settings.mlflow_dir.mkdir(parents=True)
    (settings.mlflow_dir / "sync_state.json").write_text("{not json")

    with pytest.raises(RegsandboxError) as caught:
        sync_permissions(settings, mlflow_server.secrets, QUARANTINE_USERS)

    assert caught.value.code == "SYNC_STATE_INVALID"


def test_server_command_without_secrets(tmp_path) -> None:
    env = {"REGSANDBOX_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    completed = subprocess.run(
        [sys.executable, "-m", "model_registry.server"], env=env, capture_output=True, text=True, timeout=60
    )

    assert completed.returncode == 2
    assert "regsandbox init" in completed.stderr
    assert "Traceback" not in completed.stderr


# Users from admin_api


class _UsersHandler(BaseHTTPRequestHandler):
    """admin_api's ``GET /api/v1/users``: pages of ``limit`` (at most 1000) from ``offset``, with X-Total-Count."""

    token = ""
    users: list[dict[str, Any]] = []
    seen_headers: list[dict[str, str]] = []
    seen_queries: list[dict[str, list[str]]] = []

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        type(self).seen_headers.append(dict(self.headers))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        type(self).seen_queries.append(query)
        authorised = (
            self.headers.get("Authorization") == f"Bearer {self.token}"
            and self.headers.get("X-Regsandbox-Service") == "registry"
        )
        if url.path != "/api/v1/users" or not authorised:
            self._reply(401, {"code": "NOT_AUTHENTICATED", "detail": "未登录"})
            return
        limit = min(int(query.get("limit", ["100"])[0]), 1000)
        offset = int(query.get("offset", ["0"])[0])
        self._reply(200, self.users[offset : offset + limit], total=len(self.users))

    def _reply(self, status: int, body: object, total: int | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if total is not None:
            self.send_header("X-Total-Count", str(total))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def users_api(mlflow_server: RunningMlflow) -> Iterator[type[_UsersHandler]]:
    """A stand-in for admin_api's ``GET /api/v1/users`` on the settings' admin_api port."""
    handler = type("Handler", (_UsersHandler,), {})
    handler.token = mlflow_server.secrets.service_token
    handler.users = [user("f_model", "modeller", "bank_f"), user("f_reviewer", "regulator_reviewer", None)]
    handler.seen_headers = []
    handler.seen_queries = []
    httpd = ThreadingHTTPServer(("127.0.0.1", mlflow_server.settings.admin_api_port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler
    httpd.shutdown()
    httpd.server_close()


def test_sync_fetches_users(mlflow_server: RunningMlflow, users_api: type[_UsersHandler]) -> None:
    report = sync_permissions(mlflow_server.settings, mlflow_server.secrets)

    assert report.users_synced == ["f_model", "f_reviewer"]
    assert "bank_f" in report.sandbox_experiments
    assert users_api.seen_headers[0]["X-Regsandbox-Service"] == "registry"


def test_fetch_users_pages_through_all(mlflow_server: RunningMlflow, users_api: type[_UsersHandler]) -> None:
    users_api.users = [user(f"p_user{index:04d}", "reporter", "bank_p") for index in range(2500)]

    fetched = fetch_users(mlflow_server.settings, mlflow_server.secrets)

    assert [row["username"] for row in fetched] == [row["username"] for row in users_api.users]
    assert [query["offset"] for query in users_api.seen_queries] == [["0"], ["1000"], ["2000"]]
    assert {query["limit"][0] for query in users_api.seen_queries} == {"1000"}


def test_sync_rejected_token(mlflow_server: RunningMlflow, users_api: type[_UsersHandler]) -> None:
    users_api.token = "another-token"

    with pytest.raises(RegsandboxError) as caught:
        sync_permissions(mlflow_server.settings, mlflow_server.secrets)

    assert caught.value.code == "ADMIN_API_REQUEST_FAILED"


def test_sync_command_once(mlflow_server: RunningMlflow, users_api: type[_UsersHandler]) -> None:
    settings = mlflow_server.settings
    env = {
        "REGSANDBOX_DATA_DIR": str(settings.data_dir),
        "REGSANDBOX_MLFLOW_PORT": str(settings.mlflow_port),
        "REGSANDBOX_ADMIN_API_PORT": str(settings.admin_api_port),
        "PATH": "/usr/bin:/bin",
    }

    completed = subprocess.run(
        [sys.executable, "-m", "model_registry.sync", "--loop", "0.2", "--max-runs", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.count("permission sync done") == 2


def test_sync_command_registry_down(mlflow_server: RunningMlflow, users_api: type[_UsersHandler]) -> None:
    settings = mlflow_server.settings
    env = {
        "REGSANDBOX_DATA_DIR": str(settings.data_dir),
        "REGSANDBOX_MLFLOW_PORT": str(free_port()),
        "REGSANDBOX_ADMIN_API_PORT": str(settings.admin_api_port),
        "PATH": "/usr/bin:/bin",
    }

    completed = subprocess.run(
        [sys.executable, "-m", "model_registry.sync"], env=env, capture_output=True, text=True, timeout=60
    )

    assert completed.returncode == 1
    assert "模型登记服务（MLflow）暂时无法访问" in completed.stderr
    assert "Traceback" not in completed.stderr
