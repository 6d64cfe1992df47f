"""Bridges to third-party tools, each optional: importing `streamprune` never imports them.

- `streamprune.integrations.lmms_eval`: the `streamprune` model backend for lmms-eval (needs `pip install lmms-eval`).
"""
