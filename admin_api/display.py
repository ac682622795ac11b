"""Console formatting of stored values: 北京时间, Chinese names of roles and actions, audit details.

:func:`install_filters` registers the functions as Jinja filters, so templates write
``value|beijing``, ``role|role_label``, ``action|action_label`` and ``detail|detail_lines``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from fastapi.templating import Jinja2Templates

from admin_api.models import ROLE_NAMES
from admin_api.security import ANONYMOUS, CAPABILITIES, SERVICE
from regsandbox_core.cron import PLATFORM_TIMEZONE

BEIJING = ZoneInfo(PLATFORM_TIMEZONE)
"""Zone of every time shown on the console. The database and the API keep times in UTC."""

ROLE_LABELS = {**ROLE_NAMES, SERVICE: "平台服务", ANONYMOUS: "匿名访问者", "operator": "运维人员（命令行）",
               "unknown": "未知用户"}

ACTION_LABELS = {
    "auth.token": "获取访问令牌",
    "auth.verify": "代为核验登录",
    "console.login": "控制台登录",
    "console.logout": "控制台退出",
    "roles.create": "新建自定义角色",
    "roles.update": "修改自定义角色",
    "roles.delete": "删除自定义角色",
    "users.read": "查看用户详情",
    "auth.password": "修改本人密码",
    "users.create": "新建用户",
    "users.update": "修改用户信息",
    "users.disable": "停用用户",
    "users.enable": "启用用户",
    "users.unlock": "解锁用户",
    "users.reset_password": "重置用户密码",
    "users.totp_reset": "重置动态验证码绑定",
    "users.import": "批量导入用户",
    "tokens.create": "创建个人访问令牌",
    "tokens.revoke": "吊销个人访问令牌",
    "auth.totp_enrol": "开始绑定动态验证码",
    "auth.totp_confirm": "确认绑定动态验证码",
    "models.review": "模型审查",
    "notebooks.approve": "审批报告笔记本",
    "schedules.create": "新建报告调度",
    "schedules.update": "修改报告调度",
    "runs.queue": "发起报告运行",
    "runs.claim": "领取报告运行",
    "runs.finish": "结束报告运行",
    "sandbox.spawn": "启动建模沙箱",
    "keys.list": "查看密钥列表",
    "key.generate": "生成密钥",
    "key.import": "导入密钥",
    "key.rotate": "轮换密钥",
    "key.activate": "启用密钥版本",
    "key.revoke": "吊销密钥版本",
    "key.destroy": "销毁密钥版本",
    "key.current": "读取当前密钥",
    "key.get": "读取密钥版本",
    "key.public_key": "读取签名公钥",
    "key.metadata": "读取密钥元数据",
    "key.list": "命令行查看密钥列表",
    "key.new_backup_key": "生成密钥库备份密钥",
    "key.backup": "备份密钥库",
    "key.restore": "恢复密钥库",
    "key.rotate_master": "轮换主密钥",
    "secrets.set_smtp": "设置 SMTP 登录凭据",
    "secrets.clear_smtp": "删除 SMTP 登录凭据",
    "signature.verify": "验证签名",
    "audit.export": "导出审计日志",
    "audit.verify": "校验审计日志链",
    "audit.archive": "归档审计日志",
    "audit.checkpoint": "生成审计检查点",
    "report.download": "下载归档报告",
    "institutions.create": "新建机构",
    "institutions.update": "修改机构",
    "institutions.deactivate": "停用机构",
    "institutions.reactivate": "恢复机构",
    "institutions.import": "批量导入机构",
    "institutions.export": "导出机构列表",
    "api_endpoints.create": "新建外部接口",
    "api_endpoints.update": "修改外部接口",
    "api_endpoints.delete": "删除外部接口",
    "api_endpoints.test": "测试外部接口连接",
    "messages.read": "标记系统消息已读",
    "messages.read_all": "全部系统消息标记已读",
    "messages.delete": "删除系统消息",
    "catalog.confirm": "确认数据分级分类",
    "catalog.change": "变更数据分级分类",
    "catalog.classify": "确认或变更数据分级分类",
    "catalog.sync": "同步数据目录",
    "submissions.save_draft": "保存报表草稿",
    "submissions.submit_draft": "提交报表草稿",
    "submissions.discard": "作废报表草稿",
    "submissions.findings_read": "查看报表校验结果",
    "submissions.error_report": "下载报表校验错误报告",
    "submissions.raw_read": "下载报送原始文件",
    "submissions.waive": "豁免提示类校验问题",
    "submissions.accept": "报表审核通过",
    "submissions.return": "退回报表",
    "tasks.create": "发布报送任务",
    "tasks.close": "关闭报送任务",
    "templates.upload": "上传报表模板版本",
    "templates.delete": "删除报表模板版本",
    "templates.download": "下载报表模板",
    "report_data.query": "查询报表数据",
    "report_data.export": "导出报表数据",
    "tokens.reidentify": "按案件反查令牌原始值",
    "quality.read": "查看数据质量指标",
}
"""Names of the actions admin_api and the platform services write; denials use capability names."""

DETAIL_KEY_LABELS = {
    "code": "错误代码",
    "filter": "筛选条件",
    "max_rows": "导出上限行数",
    "last_id": "最后事件编号",
    "broken_id": "断裂处事件编号",
    "first_id": "首条事件编号",
    "cutoff": "截止时间（UTC）",
    "retention_days": "保留天数",
    "decision": "审查结论",
    "comment": "审查意见",
    "institution_code": "机构代码",
    "path": "路径",
    "sm3": "SM3 摘要",
    "name": "名称",
    "notebook_id": "报告笔记本编号",
    "cron": "调度表达式",
    "enabled": "启用",
    "recipients": "收件人数",
    "schedule_id": "调度编号",
    "trigger": "触发方式",
    "status": "状态",
    "error_code": "错误代码",
    "previous_version": "原启用版本",
    "previous_state": "原状态",
    "state": "状态",
    "reason": "原因",
    "versions": "密钥版本数",
    "uscc": "统一社会信用代码",
    "parent_code": "上级机构代码",
    "changes": "修改内容（原值, 新值）",
    "file": "文件名",
    "mode": "导入方式",
    "rows": "行数",
    "imported": "导入行数",
    "rejected": "错误行数",
    "usernames": "用户名",
    "format": "文件格式",
    "base_url": "接口地址",
    "auth_type": "认证方式",
    "credentials_changed": "更换凭据",
    "key_version": "凭据密钥版本",
    "status_code": "HTTP 状态码",
    "elapsed_ms": "用时（毫秒）",
    "count": "条数",
    "from": "原分级分类",
    "to": "新分级分类",
    "created": "新增字段数",
    "updated": "更新字段数",
    "tables": "抽样数据表",
    "institution": "机构代码",
    "template": "报表模板",
    "template_version": "模板版本",
    "period_end": "报告期末",
    "version": "版本",
    "errors": "错误数",
    "warnings": "提示数",
    "unresolved": "未处理提示数",
    "superseded": "被替代的报送编号",
    "row_comments": "行级意见数",
    "warehouse_rows": "入仓行数",
    "warehouse_written": "写入数据仓库",
    "rule_id": "规则编号",
    "lines": "行号",
    "severity": "严重程度",
    "offset": "起始位置",
    "findings": "校验结果条数",
    "digest": "SM3 摘要",
    "bytes": "字节数",
    "uploaded_name": "上传文件名",
    "targets": "报送机构",
    "target_count": "报送机构数",
    "year": "年度",
    "view": "统计维度",
    "accepted": "审核通过数",
    "returned": "退回数",
    "institutions": "机构",
    "period_from": "起始报告期",
    "period_to": "截止报告期",
    "group_by": "分组字段",
    "row_count": "结果行数",
    "aggregates": "汇总指标",
    "filters": "筛选条件",
    "institution_count": "机构数",
    "matching_rows": "匹配行数",
    "partitions": "读取分区数",
    "table": "数据表",
    "column": "字段",
    "token": "令牌",
    "case_number": "案件编号",
    "token_key_version": "令牌化密钥版本",
    "requested_key_version": "指定的令牌化密钥版本",
    "period": "报告期",
    "build_id": "构建编号",
    "k": "k 匿名阈值",
    "tables_below_k": "低于 k 的表",
    "override_applied": "按强制发布处理",
    "cause": "具体原因代码",
    "k_anonymity": "k 匿名检查结果",
    "draft_id": "策略草稿编号",
    "signature_key": "签名密钥",
    "uploaded_by": "上传人",
}


def beijing(value: datetime | str | None, pattern: str = "%Y-%m-%d %H:%M:%S") -> str:
    """Format a UTC time (aware, naive-as-UTC or ISO 8601 text) in 北京时间; empty for None or bad text."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(BEIJING).strftime(pattern)


def role_label(role: str | None) -> str:
    """Return the Chinese name of a role, including custom roles, services and command-line operators."""
    if role in ROLE_LABELS:
        return ROLE_LABELS[role]
    from admin_api.roles import role_name  # admin_api.roles imports the audit module, which imports this one

    return role_name(role or "")


def action_label(action: str) -> str:
    """Return the Chinese name of an audit action or of a capability named by a denial."""
    if action in ACTION_LABELS:
        return ACTION_LABELS[action]
    entry = CAPABILITIES.get(action)
    return entry[0] if entry else ""


def _value_text(value: object) -> str:
    if isinstance(value, bool):
        return "是" if value else "否"
    if value is None:
        return "空"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def detail_lines(detail: str | None) -> list[str]:
    """Turn an audit event's JSON detail into "名称（key）: value" lines; other text is one line."""
    if not detail:
        return []
    try:
        parsed = json.loads(detail)
    except ValueError:
        return [detail]
    if not isinstance(parsed, dict):
        return [_value_text(parsed)]
    lines = []
    for key, value in parsed.items():
        label = DETAIL_KEY_LABELS.get(str(key))
        name = f"{label}（{key}）" if label else str(key)
        lines.append(f"{name}: {_value_text(value)}")
    return lines


def install_filters(templates: Jinja2Templates) -> None:
    templates.env.filters.update(
        beijing=beijing, role_label=role_label, action_label=action_label, detail_lines=detail_lines
    )
