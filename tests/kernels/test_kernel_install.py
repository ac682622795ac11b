"""Kernel spec "Python 3 (监管沙箱)": installation, listing and a real Papermill run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from regsandbox_kernel.install import KERNEL_NAME, SOURCE_DIR, install, installed_dir

VENV_BIN = Path(sys.prefix) / "bin"


@pytest.fixture
def kernel_prefix(tmp_path: Path) -> Path:
    prefix = tmp_path / "prefix"
    install(prefix)
    return prefix


def _jupyter_env(prefix: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter"), **extra}


def test_source_spec_uses_plain_python() -> None:
    spec = json.loads((SOURCE_DIR / "kernel.json").read_text(encoding="utf-8"))
    assert spec["argv"] == ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["display_name"] == "Python 3 (监管沙箱)"
    assert spec["language"] == "python"


def test_install_rewrites_interpreter(kernel_prefix: Path) -> None:
    folder = installed_dir(kernel_prefix)
    spec = json.loads((folder / "kernel.json").read_text(encoding="utf-8"))
    assert spec["argv"][0] == str(VENV_BIN / "python")
    assert Path(spec["argv"][0]).is_absolute()
    assert spec["argv"][1:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["display_name"] == "Python 3 (监管沙箱)"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "kernel.json").stat().st_mode) == 0o644


def test_install_is_idempotent(kernel_prefix: Path) -> None:
    spec_file = installed_dir(kernel_prefix) / "kernel.json"
    before = (spec_file.read_bytes(), spec_file.stat().st_mtime_ns)
    folder, changed = install(kernel_prefix)
    assert changed is False
    assert folder == installed_dir(kernel_prefix)
    assert (spec_file.read_bytes(), spec_file.stat().st_mtime_ns) == before


def test_install_repairs_changed_spec(kernel_prefix: Path) -> None:
    spec_file = installed_dir(kernel_prefix) / "kernel.json"
    spec_file.write_text(json.dumps({"argv": ["python"], "display_name": "old", "language": "python"}))
    _, changed = install(kernel_prefix)
    assert changed is True
    assert json.loads(spec_file.read_text(encoding="utf-8"))["argv"][0] == str(VENV_BIN / "python")


def test_cli_rejects_missing_python(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "regsandbox_kernel.install", "--prefix", str(tmp_path), "--python", "/nonexistent/python"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PYTHON_NOT_FOUND" in result.stderr
    assert "/nonexistent/python" in result.stderr
    assert not installed_dir(tmp_path).exists()


def test_cli_install_twice(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "regsandbox_kernel.install", "--prefix", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "已安装内核 regsandbox" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "已是最新" in second.stdout


def test_kernelspec_list_shows_it(kernel_prefix: Path) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "jupyter"), "kernelspec", "list", "--json"],
        env=_jupyter_env(kernel_prefix),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    specs = json.loads(result.stdout)["kernelspecs"]
    assert specs[KERNEL_NAME]["resource_dir"] == str(installed_dir(kernel_prefix))
    assert specs[KERNEL_NAME]["spec"]["display_name"] == "Python 3 (监管沙箱)"


def test_papermill_runs_on_kernel(kernel_prefix: Path, kernel_settings, tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (监管沙箱)", "language": "python"}
    notebook.cells = [
        nbformat.v4.new_code_cell("institution = 'bank_a'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import sys\n"
            "import regsandbox_kernel as rs\n"
            "frame = rs.table('applications')\n"
            "print(sys.executable)\n"
            "print(frame.height, rs.mlflow_experiment('pd'))"
        ),
    ]
    source = tmp_path / "tiny.ipynb"
    output = tmp_path / "tiny.out.ipynb"
    nbformat.write(notebook, source)

    environment = _jupyter_env(
        kernel_prefix,
        REGSANDBOX_EXTRACT_DIR=str(kernel_settings.extracts_dir / "bank_a"),
        REGSANDBOX_INSTITUTION="bank_a",
    )
    result = subprocess.run(
        [str(VENV_BIN / "papermill"), str(source), str(output), "-k", KERNEL_NAME, "--execution-timeout", "120"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr

    executed = nbformat.read(output, as_version=4)
    assert executed.metadata["kernelspec"]["name"] == KERNEL_NAME
    printed = "".join(item.get("text", "") for item in executed.cells[1].outputs)
    assert printed.splitlines() == [str(VENV_BIN / "python"), "334 bank_a/pd"]
