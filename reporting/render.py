"""Rendering an executed report notebook to HTML that shows text and outputs but no code."""

from __future__ import annotations

import nbformat
from nbconvert import HTMLExporter


def render_html(notebook: nbformat.NotebookNode) -> str:
    """Return the notebook as a standalone HTML page without code cells' source or prompts.

    Markdown cells and the outputs of code cells stay. The page loads no script from a CDN:
    report notebooks produce tables and images, which need neither RequireJS nor MathJax.
    """
    exporter = HTMLExporter(
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        exclude_anchor_links=True,
        embed_images=True,
        require_js_url="",
        mathjax_url="",
        mermaid_js_url="",
        mermaid_layout_elk_js_url="",
        jquery_url="",
    )
    title = notebook.metadata.get("regsandbox", {}).get("title") or notebook.metadata.get("title") or ""
    body, _resources = exporter.from_notebook_node(notebook, resources={"metadata": {"name": title}})
    return body
