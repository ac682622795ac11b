"""Scheduled report runs: scheduler, Papermill runner, HTML rendering, mailer, archive and SMTP sink.

The scheduler talks to admin_api only over HTTP (``reporting.admin_client``). The runner executes an
approved report notebook, renders it to HTML without code, emails it and archives the run under
``<data_dir>/reports``.
"""
