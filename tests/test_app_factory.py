"""The app comes from a factory: importing a module builds nothing, and each call to create_app
gives a complete app (routes, documentation, checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.main import create_app
from app.preflight import StartupError
from tests.conftest import outbox_settings
from tests.servers import ROOT


def test_importing_the_app_module_builds_no_app() -> None:
    probe = (
        "import app.main, app.__main__, sys; "
        "print(hasattr(app.main, 'app'), 'app.delivery.pipeline' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_starting_the_app_loads_nothing_of_the_event_path(tmp_path: Path) -> None:
    """Cold start is benchmarked: the event path (models, SDKs, YAML, Jinja2, the HTTP client,
    Werkzeug's Accept parser) loads on first use, not when the app is built."""
    probe = (
        "import sys, app.__main__\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        f"create_app(Settings(dead_letter_dir={str(tmp_path / 'dl')!r},"
        f" outbox_dir={str(tmp_path / 'ob')!r}, idempotency_store='memory'))\n"
        "heavy = ('app.events.models', 'app.notify.base', 'app.rules.base', 'app.rules.model',"
        " 'yaml', 'jinja2', 'aiohttp', 'sendgrid', 'cloudevents', 'werkzeug', 'google.auth',"
        " 'redis', 'sqlite3')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_document_describes_the_event_route(tmp_path: Path) -> None:
    document = create_app(outbox_settings(tmp_path)).openapi()
    assert "post" in document["paths"]["/"]
    assert set(document["paths"]) >= {"/", "/datetime", "/healthz"}


def test_create_app_refuses_a_dead_letter_folder_that_cannot_exist(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StartupError, match="DEAD_LETTER_DIR"):
        create_app(outbox_settings(tmp_path, dead_letter_dir=a_file / "dead-letter"))
