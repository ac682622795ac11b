"""Execution of a report notebook with Papermill in a child process.

Papermill runs in its own process so that the kernel gets a controlled environment: the admin_api
URL and the service token reach the notebook as environment variables, never as Papermill
parameters (those are written into the output notebook).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from reporting.config import ReportSettings

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "REGSANDBOX_REPORT_TOKEN"
ADMIN_API_VARIABLE = "REGSANDBOX_ADMIN_API_URL"
_STDERR_TAIL = 4000


@dataclass(frozen=True)
class ExecutionOutcome:
    """Result of one Papermill execution."""

    succeeded: bool
    output_path: Path
    """Output notebook; it exists after a failed cell too, with the failing cell marked."""
    stderr_tail: str
    """Last characters of Papermill's log, for the failure message and the run's log file."""
    timed_out: bool = False


@dataclass(frozen=True)
class CellFailure:
    """The first failing cell of an output notebook."""

    execution_count: int | None
    error_name: str
    error_value: str


def kernel_environment(admin_api_url: str, service_token: str) -> dict[str, str]:
    """Return the environment of Papermill and the kernel: this process's plus the admin_api access."""
    env = dict(os.environ)
    env[ADMIN_API_VARIABLE] = admin_api_url
    env[TOKEN_VARIABLE] = service_token
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_papermill(
    input_path: Path,
    output_path: Path,
    parameters: dict[str, object],
    env: dict[str, str],
    report_settings: ReportSettings,
) -> ExecutionOutcome:
    """Execute ``input_path`` into ``output_path`` with ``parameters``; the working directory is the output's folder.

    Each cell may run ``report_settings.cell_timeout`` seconds. The whole child process is bounded too:
    the kernel start timeout, plus the per-cell limit for every code cell and the injected parameters
    cell, plus 60 s for Papermill itself. Past that bound Papermill and its kernel are killed.
    """
    code_cells = sum(1 for cell in nbformat.read(input_path, as_version=4).cells if cell.cell_type == "code")
    process_timeout = report_settings.start_timeout + report_settings.cell_timeout * (code_cells + 1) + 60
    command = [
        sys.executable, "-m", "papermill", str(input_path), str(output_path),
        "--kernel", report_settings.kernel,
        "--cwd", str(output_path.parent),
        "--parameters_yaml", json.dumps(parameters, ensure_ascii=False),
        "--execution-timeout", str(max(1, round(report_settings.cell_timeout))),
        "--start-timeout", str(max(1, round(report_settings.start_timeout))),
        "--no-progress-bar",
        "--log-level", "INFO",
    ]
    logger.info(
        "executing %s into %s with kernel %s, parameters %s",
        input_path, output_path, report_settings.kernel, sorted(parameters),
    )

    # A session of its own puts Papermill and the kernel it starts in one process group to kill on timeout.
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=process_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        logger.error("papermill for %s exceeded %.0f s and was killed", output_path, process_timeout)
        return ExecutionOutcome(False, output_path, stderr[-_STDERR_TAIL:], timed_out=True)

    if process.returncode != 0:
        logger.warning("papermill for %s exited with status %d", output_path, process.returncode)
        return ExecutionOutcome(False, output_path, stderr[-_STDERR_TAIL:], timed_out="CellTimeoutError" in stderr)
    return ExecutionOutcome(True, output_path, stderr[-_STDERR_TAIL:])


def first_cell_failure(notebook: nbformat.NotebookNode) -> CellFailure | None:
    """Return the first error output of a code cell, as Papermill left it in the output notebook."""
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return CellFailure(cell.get("execution_count"), output.get("ename", ""), output.get("evalue", ""))
    return None
