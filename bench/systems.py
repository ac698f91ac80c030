"""The three systems under test, started as their users start them.

- this service: `python -m app`, configured for SendGrid through the environment, with the default
  SQLite idempotency store in a fresh working directory (Cloud Run's in-memory filesystem);
- the baseline: functions-framework 3.10 in its own virtual environment (bench/.venv-ff) running
  the book's functions (bench/baseline/), under gunicorn with 1 worker and 8 threads;
- the floor: a minimal FastAPI app on uvicorn with the service's uvicorn options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

from bench.processes import clean_environment

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEV_PYTHON = sys.executable
FF_VENV = BENCH / ".venv-ff"
FF_REQUIREMENTS = BENCH / "baseline" / "requirements.txt"
FF_NOTIFY = BENCH / "baseline" / "main.py"
FF_DATETIME = BENCH / "baseline" / "http_datetime.py"

RECIPIENTS = "ops@example.com,owner@example.com"
SENDER = "notifier@example.com"

# functions-framework 3.x serves with gunicorn unless --debug is given (_http/__init__.py picks
# GunicornApplication), with WORKERS (default 1) workers of THREADS (default 4 x CPUs) threads:
# set both to what the brief's production set-up uses rather than depend on this machine's CPUs.
FF_WORKERS = "1"
FF_THREADS = "8"


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str  # answers once the server can take requests
    ready_any_status: bool = False  # a CloudEvent function answers GET with 405


@dataclasses.dataclass(frozen=True, slots=True)
class SendGridTarget:
    url: str
    api_key: str


def service(
    port: int,
    sendgrid: SendGridTarget,
    log_level: str | None = None,
    *,
    rules: Path | None = None,
    name: str | None = None,
) -> Command:
    settings = {
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "NOTIFIER": "sendgrid",
        "SENDGRID_API_KEY": sendgrid.api_key,
        "SENDGRID_HOST": sendgrid.url,
        "NOTIFY_TO": RECIPIENTS,
        "NOTIFY_FROM": SENDER,
    }
    if log_level is not None:
        settings["LOG_LEVEL"] = log_level
    if rules is not None:
        settings["NOTIFY_RULES"] = str(rules)  # the routes name the recipients
    if name is None:
        name = "service" if log_level is None else f"service-{log_level.lower()}"
    return Command(name, [DEV_PYTHON, "-m", "app"], clean_environment(**settings), "/healthz")


def minimal(port: int) -> Command:
    env = clean_environment(PYTHONPATH=str(ROOT), HOST="127.0.0.1", PORT=str(port))
    argv = [DEV_PYTHON, "-m", "bench.minimal_app"]
    return Command("minimal", argv, env, "/datetime?requester=John")


def ff_notify(port: int, sendgrid: SendGridTarget) -> Command:
    env = clean_environment(
        WORKERS=FF_WORKERS,
        THREADS=FF_THREADS,
        SENDGRID_API_KEY=sendgrid.api_key,
        SENDGRID_HOST=sendgrid.url,
        NOTIFY_TO=RECIPIENTS,
        NOTIFY_FROM=SENDER,
    )
    argv = _functions_framework(FF_NOTIFY, "notify", "cloudevent", port)
    return Command("ff-notify", argv, env, "/", ready_any_status=True)


def ff_datetime(port: int) -> Command:
    env = clean_environment(WORKERS=FF_WORKERS, THREADS=FF_THREADS)
    argv = _functions_framework(FF_DATETIME, "get_datetime", "http", port)
    return Command("ff-datetime", argv, env, "/datetime?requester=John")


def _functions_framework(source: Path, target: str, signature: str, port: int) -> list[str]:
    return [
        str(FF_VENV / "bin" / "functions-framework"),
        f"--source={source}",
        f"--target={target}",
        f"--signature-type={signature}",
        "--host=127.0.0.1",
        f"--port={port}",
    ]


def ensure_ff_venv() -> None:
    """bench/.venv-ff from bench/baseline/requirements.txt, rebuilt when the pins change."""
    wanted = hashlib.sha256(FF_REQUIREMENTS.read_bytes()).hexdigest()
    stamp = FF_VENV / ".requirements.sha256"
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return
    print(f"bench: creating {FF_VENV.relative_to(ROOT)} (functions-framework)", flush=True)
    # Made from the interpreter that runs the bench, so both systems run the same Python.
    subprocess.run([DEV_PYTHON, "-m", "venv", "--clear", str(FF_VENV)], check=True)
    pip = [str(FF_VENV / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "-r", str(FF_REQUIREMENTS)], check=True)
    stamp.write_text(wanted + "\n")


def ff_version() -> str:
    probe = "import importlib.metadata as m; print(m.version('functions-framework'))"
    python = str(FF_VENV / "bin" / "python")
    return subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip()
