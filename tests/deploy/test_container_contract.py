"""The image's contract with Cloud Run, checked without a Docker engine.

From the Dockerfile's final stage this takes what the image copies from the build context, its
ENV, WORKDIR and start command; it runs that command in a fresh virtualenv holding requirements.txt
and nothing else (the image's /opt/venv), with the image's /tmp mapped to a temporary folder, and
checks what Cloud Run relies on: the server answers on $PORT, accepts an Eventarc CloudEvent in
binary mode, and stops within Cloud Run's 10 s between SIGTERM and SIGKILL.

Only the virtualenv's first creation uses the network (pip, from the package index); it is cached
in .venv-contract/<hash of requirements.txt and Python version>. The server binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.artifacts import ROOT, Stage, dockerfile_stages, dockerignore

CONTRACT_VENVS = ROOT / ".venv-contract"
STARTUP_SECONDS = 30.0
SIGKILL_AFTER_SECONDS = 10.0  # Cloud Run: SIGTERM, then SIGKILL 10 s later
EVENTARC_SUCCESS = {200, 201, 202, 204}  # 102 too, but never for a finished request

STORAGE_OBJECT = {
    "kind": "storage#object",
    "id": "demo/test1.txt/1714564800000000",
    "bucket": "demo",
    "name": "test1.txt",
    "generation": "1714564800000000",
    "metageneration": "1",
    "size": "12",
    "contentType": "text/plain",
    "storageClass": "STANDARD",
    "timeCreated": "2024-05-01T12:00:00.000Z",
    "updated": "2024-05-01T12:00:00.000Z",
    "md5Hash": "sQqNsWTgdUEFt6mb5y4/5Q==",
}

BINARY_MODE_HEADERS = {
    "ce-id": "contract-test-1",
    "ce-source": "//storage.googleapis.com/projects/_/buckets/demo",
    "ce-specversion": "1.0",
    "ce-type": "google.cloud.storage.object.v1.finalized",
    "ce-subject": "objects/test1.txt",
    "ce-time": "2024-05-01T12:00:00.000Z",
    "ce-bucket": "demo",
    "content-type": "application/json",
}


def contract_venv() -> Path:
    """A virtualenv with requirements.txt only, built once per requirements and Python version."""
    key = hashlib.sha256(
        (ROOT / "requirements.txt").read_bytes() + sys.version.encode()
    ).hexdigest()[:16]
    venv = CONTRACT_VENVS / key
    complete = venv / ".complete"
    CONTRACT_VENVS.mkdir(exist_ok=True)
    with (CONTRACT_VENVS / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run waits instead of building it twice
        if not complete.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                    str(ROOT / "requirements.txt"),
                ],
                check=True,
                timeout=900,
            )
            complete.touch()
    return venv


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Container:
    """The start command of the image, running as a local process."""

    process: subprocess.Popen[bytes]
    base_url: str
    root: Path  # stands for the image's /tmp
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, trust_env=False, timeout=10.0)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def image_layout(final: Stage, venv: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """The image's WORKDIR and ENV with /opt/venv and /tmp mapped to local folders."""
    (venv_copy,) = [copy for copy in final.copies if copy.from_stage is not None]
    image_venv = venv_copy.destination.rstrip("/")
    workdir_instruction = final.last("WORKDIR")
    assert workdir_instruction is not None, "the final stage sets no WORKDIR"
    workdir = root / "image" / workdir_instruction.arguments.lstrip("/")

    def local(value: str) -> str:
        # The image's /tmp first: the local venv may itself live under /tmp (a clone there).
        value = value.replace("/tmp/", f"{root}/").replace(image_venv, str(venv))
        return value.replace("$PATH", os.defpath).replace("${PATH}", os.defpath)

    env = {key: local(value) for key, value in final.env.items()}
    return workdir, env


def copy_build_context(final: Stage, workdir: Path) -> None:
    """COPY of the final stage from the build context, .dockerignore applied."""
    ignore = dockerignore()
    for copy in final.copies:
        if copy.from_stage is not None:
            continue
        destination = workdir / copy.destination
        for source in copy.sources:
            path = ROOT / source
            if path.is_file():
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)
                continue

            def ignored(folder: str, names: list[str]) -> set[str]:
                relative = Path(folder).relative_to(ROOT)
                return {name for name in names if ignore.excludes(str(relative / name))}

            shutil.copytree(path, destination, ignore=ignored, dirs_exist_ok=True)


def start_container(root: Path) -> Container:
    final = dockerfile_stages()[-1]
    venv = contract_venv()
    workdir, env = image_layout(final, venv, root)
    copy_build_context(final, workdir)
    port = free_port()
    env |= {
        "PORT": str(port),
        "HOST": "127.0.0.1",  # the image says 0.0.0.0; a test stays on loopback
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "NOTIFIER": "outbox",
        "NOTIFY_TO": "ops@example.com",
        "NOTIFY_FROM": "notifier@example.com",
        "EVENT_AUTH": "none",
        "LOG_LEVEL": "INFO",
    }
    entrypoint = final.last("ENTRYPOINT")
    command = final.last("CMD")
    assert command is not None
    argv = [*(entrypoint.exec_form or [] if entrypoint else []), *(command.exec_form or [])]
    assert argv, "the image has no exec-form start command"
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable is not None, f"{argv[0]} is not on the image's PATH"
    assert Path(executable).is_relative_to(venv), f"{argv[0]} must come from the image's venv"
    log = root / "container.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [executable, *argv[1:]],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    container = Container(process, f"http://127.0.0.1:{port}", root, log)
    deadline = time.monotonic() + STARTUP_SECONDS
    with container.client() as client:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the start command exited with {process.returncode}:\n{container.output()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if client.get("/healthz").status_code == 200:
                    return container
            if time.monotonic() > deadline:
                container.stop()
                pytest.fail(f"no answer on $PORT within {STARTUP_SECONDS} s:\n{container.output()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    running = start_container(tmp_path_factory.mktemp("image"))
    yield running
    running.stop()


def test_datetime_answers_on_port(container: Container) -> None:
    with container.client() as client:
        answer = client.get("/datetime", params={"requester": "John"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "John" in answer.text


def test_binary_mode_storage_event_is_accepted_and_notified(container: Container) -> None:
    with container.client() as client:
        answer = client.post(
            "/",
            params={"__GCP_CloudEventsMode": "GCS_NOTIFICATION"},
            headers=BINARY_MODE_HEADERS,
            content=json.dumps(STORAGE_OBJECT),
        )
    assert answer.status_code in EVENTARC_SUCCESS, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    emails = list(container.root.rglob("*.eml"))
    assert len(emails) == 1, container.output()
    assert "test1.txt" in emails[0].read_text(errors="replace")


def test_sigterm_stops_the_server_before_cloud_run_would_kill_it(tmp_path: Path) -> None:
    container = start_container(tmp_path)
    try:
        with container.client() as client:
            assert client.get("/datetime").status_code == 200
        sent = time.monotonic()
        container.process.send_signal(signal.SIGTERM)
        try:
            returncode = container.process.wait(timeout=SIGKILL_AFTER_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {SIGKILL_AFTER_SECONDS} s after SIGTERM")
        elapsed = time.monotonic() - sent
    finally:
        container.stop()
    # uvicorn shuts down, then re-raises the signal it caught: exit 0 or "killed by SIGTERM".
    assert returncode in {0, -signal.SIGTERM}, container.output()
    assert elapsed < SIGKILL_AFTER_SECONDS
    output = container.output()
    assert "Traceback" not in output, output
    # Cloud Logging reads one JSON object per line of stdout/stderr.
    for line in output.splitlines():
        if line.strip():
            assert isinstance(json.loads(line), dict), line
