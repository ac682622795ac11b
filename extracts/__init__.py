"""Demo data, the raw warehouse and the masked per-institution extracts.

Public entry points: :func:`extracts.demo_data.load_demo` and :func:`extracts.builder.build_extract`,
and the operator command ``python -m extracts``.
"""
