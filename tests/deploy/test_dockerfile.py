"""The Dockerfile and .dockerignore, read the way `docker build` reads them.

hadolint and checkov lint the same file in .ci/check_deploy.sh; these tests hold the project's own
rules: the tested Python, runtime dependencies only, a non-root user, a start command that gets
SIGTERM, writable state under /tmp, and a build context with nothing private in it.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib

import pytest

from tests.deploy.artifacts import ROOT, DockerIgnore, Stage, dockerfile_stages, dockerignore

SLIM_PYTHON = re.compile(r"^python:(?P<minor>3\.\d+)(?:\.\d+)?-slim(?:-[a-z]+)?$")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages()


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_every_stage_is_the_official_slim_python_the_tests_run_on(stages: list[Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tested = pyproject["tool"]["mypy"]["python_version"]
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    for stage in stages:
        match = SLIM_PYTHON.match(stage.base)
        assert match, f"{stage.base}: expected an official python:X.Y-slim image"
        assert match["minor"] == tested, f"{stage.base}: pyproject targets Python {tested}"
        assert match["minor"] == running, f"{stage.base}: these tests run on Python {running}"
    # One base for all stages: the virtualenv built in one stage runs in the next.
    assert len({stage.base for stage in stages}) == 1


def test_image_installs_requirements_txt_only_without_a_pip_cache(stages: list[Stage]) -> None:
    installs = [
        run.arguments
        for stage in stages
        for run in stage.all("RUN")
        if re.search(r"\bpip3? install\b", run.arguments)
    ]
    assert installs, "no pip install in the Dockerfile"
    for command in installs:
        words = shlex.split(command)
        assert "--no-cache-dir" in words, command
        requirement_files = [words[i + 1] for i, word in enumerate(words) if word == "-r"]
        assert [name.rsplit("/", 1)[-1] for name in requirement_files] == ["requirements.txt"]
        # Only -r: no package named on the command line can slip past the pins.
        named = [word for word in words[words.index("install") + 1 :] if not word.startswith("-")]
        assert named == requirement_files, command
    instructions = " ".join(
        each.arguments.lower() for stage in stages for each in stage.instructions
    )
    for dev_only in ("requirements-dev", "pytest", "ruff", "mypy", "hypothesis", "hadolint"):
        assert dev_only not in instructions


def test_final_stage_runs_as_a_non_root_user(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "the final stage has no USER"
    name = user.arguments.split(":")[0]
    assert name not in {"root", "0"}
    keywords = [each.keyword for each in final.instructions]
    assert keywords.index("USER") < keywords.index("CMD")


def test_python_output_is_unbuffered_and_the_server_listens_on_port_8080(final: Stage) -> None:
    env = final.env
    assert env["PYTHONUNBUFFERED"] == "1"  # log lines reach Cloud Logging as they are written
    assert env["HOST"] == "0.0.0.0"  # Cloud Run's contract: all interfaces, $PORT
    assert env["PORT"] == "8080"
    exposed = final.last("EXPOSE")
    assert exposed is not None
    assert exposed.arguments == "8080"


def test_start_command_is_exec_form_so_sigterm_reaches_the_server(final: Stage) -> None:
    command = final.last("CMD")
    assert command is not None
    argv = command.exec_form
    assert argv is not None, "shell-form CMD runs under /bin/sh, which does not forward SIGTERM"
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is None or entrypoint.exec_form is not None
    if argv[0] in {"sh", "/bin/sh", "bash", "/bin/bash"}:
        assert argv[-1].lstrip().startswith("exec "), "a shell must exec the server"
    else:
        assert argv == ["python", "-m", "app"]


def test_state_the_service_writes_lives_under_tmp(final: Stage) -> None:
    env = final.env
    assert env["OUTBOX_DIR"].startswith("/tmp/")
    assert env["DEAD_LETTER_DIR"].startswith("/tmp/")
    assert env["IDEMPOTENCY_STORE"].startswith("sqlite:////tmp/")


def test_final_stage_copies_only_the_app_and_the_built_virtualenv(
    stages: list[Stage], final: Stage
) -> None:
    stage_names = {stage.name for stage in stages[:-1]}
    for copy in final.copies:
        if copy.from_stage is not None:
            assert copy.from_stage in stage_names
            continue
        assert copy.sources == ("app/",), copy
    assert not final.all("ADD"), "COPY says what it does; ADD also fetches and unpacks"


@pytest.mark.parametrize(
    "path",
    ["app/__main__.py", "app/server.py", "app/main.py", "app/config.py", "requirements.txt"],
)
def test_build_context_keeps_what_the_dockerfile_copies(path: str) -> None:
    assert (ROOT / path).exists()
    assert not dockerignore().excludes(path)


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-contract/abc/bin/python",
        ".venv-checkov/bin/checkov",
        "tests/deploy/test_dockerfile.py",
        "state/notifier.db",
        "outbox/20250101T000000Z-0123456789abcdef.eml",
        "dead-letter/event.json",
        "app/__pycache__/main.cpython-311.pyc",
        "requirements-dev.txt",
        "eventarc.tf",
        "terraform.tfstate",
    ],
)
def test_build_context_leaves_out_secrets_state_and_tooling(path: str) -> None:
    assert dockerignore().excludes(path)


def test_every_copied_source_is_in_the_build_context(stages: list[Stage]) -> None:
    ignore = dockerignore()
    for stage in stages:
        for copy in stage.copies:
            if copy.from_stage is not None:
                continue
            for source in copy.sources:
                path = ROOT / source
                assert path.exists(), source
                files = [path] if path.is_file() else list(path.rglob("*.py"))
                assert files, source
                for file in files:
                    if "__pycache__" not in file.parts:
                        assert not ignore.excludes(str(file.relative_to(ROOT))), file


def test_dockerignore_reader_follows_docker_rules() -> None:
    rules = DockerIgnore.parse("*\n!app/\napp/secret.txt\n**/__pycache__\n")
    assert rules.excludes("README.md")
    assert not rules.excludes("app/main.py")
    assert rules.excludes("app/secret.txt")  # the last matching rule decides
    assert rules.excludes("app/api/__pycache__/x.pyc")  # a matched folder takes its contents
