"""The Firestore emulator of the Google Cloud SDK on a free loopback port, for the Firestore store
tests. A pytest plugin: a test module says `pytest_plugins = ["tests.firestore_emulator"]` and
asks for `firestore_url`.

- `firestore_emulator` (session): starts the emulator once (its log goes to a file in the
  session's tmp dir) and yields its `HOST:PORT`; stops it at the end.
- `firestore_url` (each test): sets FIRESTORE_EMULATOR_HOST (the client reads it when it is
  made, so make stores inside the test) and yields `firestore://PROJECT/DATABASE?prefix=test`
  for a project of the test's own; its documents are deleted afterwards.

Outside CI a machine without the emulator (or Java) skips these tests saying how to install it;
under CI=true (where .ci/run installs it) that is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

JAR = "platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
INSTALL = (
    "apt-get install google-cloud-cli-firestore-emulator openjdk-17-jre-headless,"
    " or gcloud components install cloud-firestore-emulator"
)
DATABASE = "gcs-notifier"
START_SECONDS = 60.0  # a JVM on a busy two-core machine


def _sdk_roots() -> Iterator[Path]:
    gcloud = shutil.which("gcloud")
    if gcloud is not None:
        answer = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if answer.returncode == 0 and answer.stdout.strip():
            yield Path(answer.stdout.strip())
    yield Path("/usr/lib/google-cloud-sdk")


def emulator_command() -> list[str]:
    """`java -cp JAR CLASS start` without host and port; skips (fails under CI) when missing."""
    java = shutil.which("java")
    jar = next((root / JAR for root in _sdk_roots() if (root / JAR).is_file()), None)
    if java is None or jar is None:
        missing = "java" if java is None else "the Firestore emulator"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} is required under CI=true (.ci/run installs it: {INSTALL})")
        pytest.skip(f"{missing} not installed ({INSTALL}); CI runs these")
    return [java, "-cp", str(jar), MAIN_CLASS, "start"]


@contextmanager
def firestore_emulator_process(log: Path) -> Iterator[str]:
    """Start an emulator, yield its HOST:PORT once it answers, stop it afterwards."""
    port = free_port()
    host = f"127.0.0.1:{port}"
    command = [*emulator_command(), "--host=127.0.0.1", f"--port={port}"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(host, process, log)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_until_ready(host: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            if httpx.get(f"http://{host}/", timeout=2).text.strip() == "Ok":
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Firestore emulator did not start; its log: {log}")
        time.sleep(0.1)


def wipe(host: str, project: str, database: str = DATABASE) -> None:
    """Delete every document of one project's database (the emulator's own endpoint)."""
    url = f"http://{host}/emulator/v1/projects/{project}/databases/{database}/documents"
    httpx.delete(url, timeout=30).raise_for_status()


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("firestore-emulator") / "emulator.log"
    with firestore_emulator_process(log) as host:
        yield host


@pytest.fixture
def firestore_url(firestore_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    project = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    yield f"firestore://{project}/{DATABASE}?prefix=test"
    wipe(firestore_emulator, project)
