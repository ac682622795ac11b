"""Chinese names of the report intake actions shown in the audit log."""

from __future__ import annotations

import pytest

from admin_api.display import action_label

INTAKE_ACTIONS = {
    "submissions.submit": "报送报表",
    "submissions.save_draft": "保存报表草稿",
    "submissions.submit_draft": "提交报表草稿",
    "submissions.discard": "作废报表草稿",
    "submissions.waive": "豁免提示类校验问题",
    "submissions.accept": "报表审核通过",
    "submissions.return": "退回报表",
    "tasks.create": "发布报送任务",
    "templates.upload": "上传报表模板版本",
    "report_data.export": "导出报表数据",
}


@pytest.mark.parametrize(("action", "expected"), sorted(INTAKE_ACTIONS.items()))
def test_intake_action_label(action: str, expected: str) -> None:
    assert action_label(action) == expected
