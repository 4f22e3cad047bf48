"""The web page for the lab, under `/ui/` of the metrics endpoint: what arrived, what is held and why.

`UiApp` (ingestd/ui/app.py) is the WSGI application the daemon hands to `ingestd.metrics.MetricsServer`; the pages'
data come from `ingestd.status.status_data` (ingestd/ui/views.py), the login from ingestd/ui/auth.py (the token or
password form and its signed cookie, ingestd/ui/session.py; the password file, ingestd/ui/passwords.py; HTTP
Basic), the HTML from the templates in ingestd/ui/templates/ (shipped in the package, as is the style sheet in
ingestd/ui/static/).
"""

from __future__ import annotations

from ingestd.ui.app import UiApp

__all__ = ["UiApp"]
