"""Live user interfaces for the streaming engine."""

from streamprune.ui.web import WebDashboard

__all__ = ["WebDashboard"]
