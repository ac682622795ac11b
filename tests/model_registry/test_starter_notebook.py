"""The starter PD notebook, run by Papermill on the ``regsandbox`` kernel against a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from extracts.builder import build_extract
from extracts.demo_data import load_demo
from model_registry.sync import sync_permissions
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import mlflow_password
from tests.model_registry.conftest import RunningMlflow
from tests.extract_setup import approve_shipped_policy

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "starter" / "pd_model_starter.ipynb"

USERS = [
    {"username": "nb_a", "role": "modeller", "institution_code": "bank_a", "is_active": True, "email": None},
    {"username": "nb_b", "role": "modeller", "institution_code": "bank_b", "is_active": True, "email": None},
    {"username": "nb_reviewer", "role": "regulator_reviewer", "institution_code": None, "is_active": True, "email": None},
]


def test_notebook_metadata() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]

    assert notebook.metadata["kernelspec"]["name"] == "regsandbox"
    assert notebook.metadata["kernelspec"]["display_name"] == "Python 3 (监管沙箱)"
    assert len(parameters) == 1
    assert all(cell.outputs == [] for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_starter_notebook_registers_model(mlflow_server: RunningMlflow, tmp_path: Path) -> None:
    settings, secrets = mlflow_server.settings, mlflow_server.secrets
    load_demo(settings)
    ensure_platform_keys(settings, ["bank_a"], on_event=None)
    approve_shipped_policy(settings)
    extract = build_extract(settings, "bank_a")
    sync_permissions(settings, secrets, USERS)
    output = tmp_path / "output.ipynb"
    env = {
        **os.environ,
        "REGSANDBOX_EXTRACT_DIR": str(extract),
        "REGSANDBOX_INSTITUTION": "bank_a",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_TRACKING_USERNAME": "nb_a",
        "MLFLOW_TRACKING_PASSWORD": mlflow_password(secrets, "nb_a"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }

    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOK), str(output), "-k", "regsandbox", "--cwd", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    elapsed = time.monotonic() - started

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert elapsed < 45
    printed = "".join(
        output.get("text", "")
        for cell in nbformat.read(output, as_version=4).cells
        for output in cell.get("outputs", [])
    )
    assert "注册模型：bank_a.pd_logreg，版本 1" in printed

    # The version is in bank_a's namespace, carries the run's metrics and was logged by nb_a.
    sync_permissions(settings, secrets, USERS)
    with mlflow_server.admin() as admin:
        versions = [row for row in admin.list_model_versions() if row["name"] == "bank_a.pd_logreg"]
        experiments = {row["name"] for row in admin.list_experiments()}
    assert len(versions) == 1
    assert 0.6 < versions[0]["metrics"]["auc"] <= 1.0
    assert 0.0 < versions[0]["metrics"]["ks"] <= 1.0
    assert "bank_a/pd_model" in experiments

    # bank_b cannot read the model; the regulator can.
    other = mlflow_server.user_client("nb_b", mlflow_password(secrets, "nb_b"))
    reviewer = mlflow_server.user_client("nb_reviewer", mlflow_password(secrets, "nb_reviewer"))
    params = {"name": "bank_a.pd_logreg"}
    assert other.get("/api/2.0/mlflow/registered-models/get", params=params).status_code == 403
    assert reviewer.get("/api/2.0/mlflow/registered-models/get", params=params).status_code == 200


def test_notebook_excludes_masked_columns() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")

    assert 'column["treatment"] != "keep"' in source
    assert "person_token" not in source
    assert json.dumps(notebook.metadata, ensure_ascii=False).count("监管沙箱") == 1
