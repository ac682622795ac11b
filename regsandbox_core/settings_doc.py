"""Generate ``docs/settings.md`` from the fields of :class:`Settings`, so the page cannot drift.

Run ``python -m regsandbox_core.settings_doc > docs/settings.md`` after changing a setting.
"""

from __future__ import annotations

from regsandbox_core.settings import PROJECT_ROOT, Settings


def render() -> str:
    """Return the Markdown reference of every setting: variable, default and description."""
    lines = [
        "# Settings",
        "",
        "Every process reads these environment variables (generated from `regsandbox_core/settings.py`).",
        "",
        "| variable | default | description |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if hasattr(default, "is_relative_to") and default.is_relative_to(PROJECT_ROOT):
            default = f"<checkout>/{default.relative_to(PROJECT_ROOT)}"
        lines.append(f"| `REGSANDBOX_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
