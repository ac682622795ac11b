"""The demo report files of intake.samples pass validation together, and the broken copy shows its three errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from intake.samples import BROKEN_LOANS_NAME, CONTRACTS, CUSTOMERS, LOANS, write_samples

from .conftest import Env
from .test_submissions import LICENSE, bank_a_licence, upload  # noqa: F401  # module fixture: bank_a's 金融许可证号

PERIOD = "20250930"


def findings(env: Env, submission_id: int) -> list[tuple[str, str, str]]:
    report = env.client.get(f"/api/v1/submissions/{submission_id}/errors.csv", headers=env.auth("reporter_a"))
    assert report.status_code == 200, report.text
    rows = list(csv.DictReader(io.StringIO(report.content.decode("utf-8-sig"))))
    return sorted((row["行号"], row["字段代码"], row["严重程度"]) for row in rows)


def test_samples_validate_as_a_batch(env: Env, tmp_path: Path) -> None:
    files = {path.name: path for path in write_samples(tmp_path, LICENSE, 1, PERIOD)}
    states = {}
    for code in (CUSTOMERS, CONTRACTS, LOANS):
        response = upload(env, "reporter_a", code, PERIOD, files[f"{code}.txt"].read_bytes())
        assert response.status_code == 201, response.text
        body = response.json()
        states[code] = (body["state"], body["error_count"], body["warning_count"], body["row_count"])
    broken = upload(env, "reporter_a", LOANS, PERIOD, files[BROKEN_LOANS_NAME].read_bytes(), name=BROKEN_LOANS_NAME)

    assert states == {CUSTOMERS: ("pending_review", 0, 0, 20), CONTRACTS: ("pending_review", 0, 0, 20),
                      LOANS: ("pending_review", 0, 1, 20)}
    assert broken.status_code == 201, broken.text
    assert (broken.json()["state"], broken.json()["error_count"]) == ("validation_failed", 3)
    assert [(line, field) for line, field, severity in findings(env, broken.json()["id"]) if severity == "错误"] == [
        ("3", "JJYE"), ("4", "WJFL"), ("5", "DKDQRQ")]
