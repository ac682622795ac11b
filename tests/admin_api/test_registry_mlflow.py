"""Model review against a real MLflow server through model_registry.client (the default adapter).

The server runs without its auth app (the admin client's basic-auth header is then ignored),
on a free port with a temporary SQLite store. Starting it takes 10-40 s, hence ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from admin_api.registry import MlflowRegistry

from .conftest import Env, free_port

pytestmark = pytest.mark.slow

MODEL = "bank_c.mlflow_scorecard"


def _wait_ready(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not ready after {seconds} s")


def _register_version(url: str) -> str:
    """Create an experiment, a run with AUC/KS and a model version of MODEL through the REST API."""
    with httpx.Client(base_url=url, timeout=30) as http:
        experiment = http.post("/api/2.0/mlflow/experiments/create", json={"name": "bank_c/scorecard"}).json()
        run = http.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment["experiment_id"]}).json()
        run_id = run["run"]["info"]["run_id"]
        for key, value in (("auc", 0.8123), ("ks", 0.4567)):
            http.post("/api/2.0/mlflow/runs/log-metric",
                      json={"run_id": run_id, "key": key, "value": value, "timestamp": 0, "step": 0})
        http.post("/api/2.0/mlflow/registered-models/create", json={"name": MODEL}).raise_for_status()
        created = http.post("/api/2.0/mlflow/model-versions/create",
                            json={"name": MODEL, "source": f"runs:/{run_id}/model", "run_id": run_id})
        created.raise_for_status()
        return str(created.json()["model_version"]["version"])


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": url},
    )
    try:
        _wait_ready(url, process, 120)
        _register_version(url)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def real_registry(env: Env, mlflow_url: str) -> Iterator[str]:
    app = env.client.app
    original = app.state.registry
    app.state.registry = MlflowRegistry(mlflow_url, env.secrets.mlflow_admin_password)
    try:
        yield mlflow_url
    finally:
        app.state.registry = original


def _tags(url: str, version: str) -> dict[str, str]:
    body = httpx.get(f"{url}/api/2.0/mlflow/model-versions/get", params={"name": MODEL, "version": version}).json()
    return {tag["key"]: tag["value"] for tag in body["model_version"].get("tags", [])}


def test_mlflow_list_and_review(env: Env, real_registry: str) -> None:
    listing = env.client.get("/api/v1/models", headers=env.auth("reviewer"))
    item = next(i for i in listing.json() if i["name"] == MODEL)
    assert listing.status_code == 200
    assert (item["institution_code"], item["auc"], item["ks"]) == ("bank_c", 0.8123, 0.4567)

    tags_before = _tags(real_registry, item["version"])
    denied = env.client.post(
        f"/api/v1/models/{MODEL}/versions/{item['version']}/review", headers=env.auth("modeller_c"),
        json={"decision": "approved", "comment": ""},
    )
    assert denied.status_code == 403
    assert _tags(real_registry, item["version"]) == tags_before

    comment = f"{env.backend} 样本外 KS 偏低，请补充说明"
    response = env.client.post(
        f"/api/v1/models/{MODEL}/versions/{item['version']}/review", headers=env.auth("reviewer"),
        json={"decision": "returned", "comment": comment},
    )
    tags = _tags(real_registry, item["version"])
    assert response.status_code == 200, response.text
    assert tags["regsandbox.review.status"] == "returned"
    assert tags["regsandbox.review.comment"] == comment
    assert tags["regsandbox.review.reviewer"] == "reviewer"
    assert tags["regsandbox.review.decided_at"]
