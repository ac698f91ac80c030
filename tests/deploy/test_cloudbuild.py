"""cloudbuild.yaml, checked the way Cloud Build reads it, with the values `gcloud builds submit`
gives the built-in substitutions when it uploads a local folder: no commit, no branch.

Rules from Cloud Build's "Substituting variable values": user substitutions match `_[A-Z0-9_]+`,
a `$$` is a literal `$` (a bash variable of the step), and by default (substitution_option
MUST_MATCH) a build fails if it references an undefined substitution or defines an unused one.

The `check` and `deploy` steps are bash scripts: they run here under bash, with the step's `env`
as Cloud Build resolves it, against a stand-in `gcloud` that records its arguments (Google's
command line tool, the one thing not run for real), so the tests see the exact `gcloud run deploy`
command each choice of substitutions produces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.artifacts import (
    BUILTIN_SUBSTITUTIONS,
    blocks,
    dockerfile_stages,
    dynamic,
    load_cloudbuild,
    load_terraform,
    locals_,
    of_type,
    resources,
    single,
    strings,
    substitute,
    substitution_references,
    version_rule,
    with_locals,
)

# What `gcloud builds submit --config cloudbuild.yaml` from a local folder leaves in the built-ins.
LOCAL_SUBMIT = {
    "PROJECT_ID": "my-project",
    "BUILD_ID": "6f1d3c2a-8a45-4f8e-9d7b-0c1e2f3a4b5c",
    "PROJECT_NUMBER": "123456789012",
    "LOCATION": "global",
    "TRIGGER_NAME": "",
    "COMMIT_SHA": "",
    "SHORT_SHA": "",
    "REVISION_ID": "",
    "REPO_NAME": "",
    "REPO_FULL_NAME": "",
    "BRANCH_NAME": "",
    "TAG_NAME": "",
    "REF_NAME": "",
    "TRIGGER_BUILD_CONFIG_PATH": "",
    "SERVICE_ACCOUNT_EMAIL": "123456789012-compute@developer.gserviceaccount.com",
    "SERVICE_ACCOUNT": "projects/my-project/serviceAccounts/"
    "123456789012-compute@developer.gserviceaccount.com",
}

# What the README's `gcloud builds submit` passes on top of the defaults.
SUBMITTED = {"_SENDGRID_SECRET_VERSION": "3"}

# REGION-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE:TAG, every part present.
ARTIFACT_REGISTRY_IMAGE = re.compile(
    r"^[a-z][a-z0-9-]*-docker\.pkg\.dev/[a-z][a-z0-9-]{4,28}[a-z0-9]"
    r"/[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
)


@pytest.fixture(scope="module")
def build() -> dict[str, Any]:
    return load_cloudbuild()


def defaults(build: dict[str, Any]) -> dict[str, str]:
    return {**LOCAL_SUBMIT, **build["substitutions"]}


def steps_by_id(build: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in build["steps"]}


def resolved_args(build: dict[str, Any], step_id: str) -> list[str]:
    values = defaults(build)
    return [substitute(arg, values) for arg in steps_by_id(build)[step_id]["args"]]


def flag(args: list[str], name: str) -> str:
    found = [arg.partition("=")[2] for arg in args if arg.startswith(f"{name}=")]
    assert len(found) == 1, (name, args)
    return found[0]


@dataclass(frozen=True)
class StepRun:
    returncode: int
    stderr: str
    gcloud_calls: list[list[str]]


FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["GCLOUD_CALLS"], "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def run_step(build: dict[str, Any], step_id: str, tmp_path: Path, **substitutions: str) -> StepRun:
    """One script step as Cloud Build runs it: substitutions resolved in `env` and `args`, then
    `entrypoint args...` with that environment, `gcloud` being a recorder."""
    step = steps_by_id(build)[step_id]
    assert step["entrypoint"] == "bash"
    values = {**defaults(build), **SUBMITTED, **substitutions}
    step_env = dict(substitute(entry, values).partition("=")[::2] for entry in step.get("env", []))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    calls = tmp_path / "gcloud-calls.jsonl"
    calls.unlink(missing_ok=True)
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, *(substitute(arg, values) for arg in step["args"])],
        env={
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "GCLOUD_CALLS": str(calls),
            **step_env,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return StepRun(result.returncode, result.stderr, [json.loads(line) for line in recorded])


def deploy_args(build: dict[str, Any], tmp_path: Path, **substitutions: str) -> list[str]:
    """The arguments of the one `gcloud beta run deploy` the deploy step runs (beta: --max, the
    service-level instance cap, is a beta flag)."""
    run = run_step(build, "deploy", tmp_path, **substitutions)
    assert run.returncode == 0, run.stderr
    (call,) = run.gcloud_calls
    assert call[:3] == ["beta", "run", "deploy"]
    return call[1:]


def secrets(args: list[str]) -> dict[str, str]:
    """--update-secrets split as gcloud does (one KEY=SECRET:VERSION per comma). A key that starts
    with "/" is the path of a file the secret version is mounted as; any other, a variable."""
    pairs = [item.partition("=") for item in flag(args, "--update-secrets").split(",")]
    assert all(separator == "=" for _, separator, _ in pairs), pairs
    return {key: value for key, _, value in pairs}


def removed_secrets(args: list[str]) -> list[str]:
    return [
        key
        for arg in args
        if arg.startswith("--remove-secrets=")
        for key in arg.partition("=")[2].split(",")
    ]


def env_vars(args: list[str]) -> dict[str, str]:
    """--set-env-vars split as gcloud does, honouring a `^DELIM^` prefix (gcloud topic escaping)."""
    value = flag(args, "--set-env-vars")
    delimiter = ","
    if match := re.match(r"\^(.+?)\^", value):
        delimiter, value = match[1], value[match.end() :]
    pairs = [item.partition("=") for item in value.split(delimiter)]
    assert all(separator == "=" for _, separator, _ in pairs), value
    return {key: item for key, _, item in pairs}


def test_substitution_reader_treats_double_dollars_as_bash() -> None:
    assert substitution_references("echo $$HOME ${_TAG} $PROJECT_ID-x $${X}") == [
        "_TAG",
        "PROJECT_ID",
    ]
    assert substitute("a-$$HOME-${_TAG}:$BUILD_ID", {"_TAG": "t", "BUILD_ID": "b"}) == (
        "a-$HOME-t:b"
    )
    with pytest.raises(ValueError, match="lone"):
        substitution_references("costs 5$")


def test_every_reference_is_a_builtin_or_a_defined_substitution(build: dict[str, Any]) -> None:
    defined = set(build["substitutions"])
    body = {key: value for key, value in build.items() if key != "substitutions"}
    referenced = {name for text in strings(body) for name in substitution_references(text)}
    assert referenced <= BUILTIN_SUBSTITUTIONS | defined, referenced - defined
    if build.get("options", {}).get("substitution_option") != "ALLOW_LOOSE":
        assert defined <= referenced, f"defined but unused: {defined - referenced}"


# Substitutions the operator must pass; the check step refuses the build without them.
REQUIRED = {"_SENDGRID_SECRET_VERSION"}
# Substitutions whose empty default means "not used" (no rules file).
OPTIONAL = {"_RULES_SECRET", "_RULES_SECRET_VERSION"}


def test_user_substitutions_are_underscored_with_defaults_and_shadow_no_builtin(
    build: dict[str, Any],
) -> None:
    assert set(SUBMITTED) == REQUIRED
    for key, value in build["substitutions"].items():
        assert re.fullmatch(r"_[A-Z0-9_]+", key), key
        assert key[1:] not in BUILTIN_SUBSTITUTIONS, f"{key} reads like the built-in ${key[1:]}"
        assert isinstance(value, str), f"{key}: quote it, Cloud Build substitutions are strings"
        assert bool(value) != (key in REQUIRED | OPTIONAL), f"{key}: a default only where safe"
        assert "$" not in value, f"{key}: defaults are not substituted (no dynamic substitutions)"


def test_scripts_take_substitutions_through_env_only(build: dict[str, Any]) -> None:
    # A substitution pasted into a script is code to bash: a quote or $(...) in a recipient list
    # would break the deploy or run. Through `env` it stays data.
    for step in build["steps"]:
        if step.get("entrypoint") != "bash":
            continue
        script = step["args"][-1]
        assert substitution_references(script) == [], step["id"]
        assert step["args"][:-1] == ["-c"], step["id"]
        if "\n" in script.strip():  # a script, not one command: stop at its first failure
            assert script.startswith("set -euo pipefail\n"), step["id"]


def test_cloud_run_region_is_ours_not_the_build_location(build: dict[str, Any]) -> None:
    body = {key: value for key, value in build.items() if key != "substitutions"}
    referenced = {name for text in strings(body) for name in substitution_references(text)}
    assert "LOCATION" not in referenced  # $LOCATION is where the build runs


def test_image_references_are_complete_under_gcloud_builds_submit(
    build: dict[str, Any], tmp_path: Path
) -> None:
    values = defaults(build)
    references = [substitute(image, values) for image in build["images"]]
    for step in build["steps"]:
        if step.get("entrypoint") == "bash":
            continue
        args = [substitute(arg, values) for arg in step.get("args", [])]
        references += [arg.partition("=")[2] for arg in args if arg.startswith("--tag=")]
        references += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in {"-t", "--tag"}]
        if step["name"].endswith("/docker") and args[:1] == ["push"]:
            references.append(args[1])
    references.append(flag(deploy_args(build, tmp_path), "--image"))
    assert len(references) >= 4
    for reference in references:
        assert "//" not in reference, reference
        assert ARTIFACT_REGISTRY_IMAGE.match(reference), reference


def test_a_commit_based_tag_would_be_caught(build: dict[str, Any]) -> None:
    values = defaults(build)
    broken = substitute(build["images"][0].rsplit(":", 1)[0] + ":$SHORT_SHA", values)
    assert not ARTIFACT_REGISTRY_IMAGE.match(broken)


def test_deployed_image_is_the_built_pushed_and_listed_image(
    build: dict[str, Any], tmp_path: Path
) -> None:
    values = defaults(build)
    (listed,) = [substitute(image, values) for image in build["images"]]
    built = flag(resolved_args(build, "build"), "--tag")
    pushed = resolved_args(build, "push")
    assert pushed[0] == "push"
    assert built == pushed[1] == flag(deploy_args(build, tmp_path), "--image") == listed
    assert listed.endswith(":" + LOCAL_SUBMIT["BUILD_ID"])


def prerequisites(build: dict[str, Any], step_id: str) -> set[str]:
    steps = build["steps"]
    ids = [step["id"] for step in steps]
    index = ids.index(step_id)
    wait_for = steps[index].get("waitFor")
    if wait_for is None:  # Cloud Build: no waitFor means after every earlier step
        direct = set(ids[:index])
    elif wait_for == ["-"]:  # "-" means at the start of the build
        direct = set()
    else:
        direct = set(wait_for)
    return direct | {earlier for name in direct for earlier in prerequisites(build, name)}


def test_tests_run_before_the_image_is_built(build: dict[str, Any]) -> None:
    assert steps_by_id(build)["build"]["name"] == "gcr.io/cloud-builders/docker"
    assert "test" in prerequisites(build, "build")
    assert {"build", "push"} <= prerequisites(build, "deploy")
    test_command = " ".join(steps_by_id(build)["test"]["args"])
    assert "python -m pytest" in test_command
    assert "-r requirements-dev.txt" in test_command


def test_settings_are_checked_before_anything_else(build: dict[str, Any]) -> None:
    assert build["steps"][0]["id"] == "check"
    assert prerequisites(build, "check") == set()
    for step in build["steps"][1:]:
        assert "check" in prerequisites(build, step["id"]), step["id"]


def test_tests_run_on_the_python_of_the_image(build: dict[str, Any]) -> None:
    test_image = steps_by_id(build)["test"]["name"]
    assert test_image == dockerfile_stages()[-1].base


def test_deploy_sets_identity_secret_and_settings(build: dict[str, Any], tmp_path: Path) -> None:
    args = deploy_args(build, tmp_path)
    project = LOCAL_SUBMIT["PROJECT_ID"]
    subs = build["substitutions"]
    runtime = f"{subs['_RUNTIME_SA']}@{project}.iam.gserviceaccount.com"
    trigger = f"{subs['_TRIGGER_SA']}@{project}.iam.gserviceaccount.com"
    assert args[2] == subs["_SERVICE"]
    assert flag(args, "--service-account") == runtime
    assert flag(args, "--region") == subs["_REGION"]
    assert secrets(args)["SENDGRID_API_KEY"] == (
        f"{subs['_SENDGRID_SECRET']}:{SUBMITTED['_SENDGRID_SECRET_VERSION']}"
    )
    assert flag(args, "--concurrency") == "80"
    settings = env_vars(args)
    assert settings["NOTIFIER"] == "sendgrid"
    assert settings["EVENT_INVOKERS"] == trigger
    assert settings["NOTIFY_TO"] == subs["_NOTIFY_TO"]
    assert settings["NOTIFY_FROM"] == subs["_NOTIFY_FROM"]
    assert settings["GOOGLE_CLOUD_PROJECT"] == project
    assert "SENDGRID_API_KEY" not in settings, "the key comes from Secret Manager only"
    assert "PORT" not in settings, "Cloud Run sets PORT itself and rejects it"


def test_event_audience_is_the_services_deterministic_url(
    build: dict[str, Any], tmp_path: Path
) -> None:
    subs = build["substitutions"]
    audience = env_vars(deploy_args(build, tmp_path))["EVENT_AUDIENCE"]
    assert audience == (
        f"https://{subs['_SERVICE']}-{LOCAL_SUBMIT['PROJECT_NUMBER']}.{subs['_REGION']}.run.app"
    )
    other = env_vars(deploy_args(build, tmp_path, _SERVICE="mailer", _REGION="europe-west1"))
    assert other["EVENT_AUDIENCE"] == "https://mailer-123456789012.europe-west1.run.app"


@pytest.mark.parametrize(
    ("public", "access", "event_auth"),
    [("true", "--allow-unauthenticated", "oidc"), ("false", "--no-allow-unauthenticated", "iam")],
)
def test_event_auth_pairs_with_who_may_invoke(
    build: dict[str, Any], tmp_path: Path, public: str, access: str, event_auth: str
) -> None:
    args = deploy_args(build, tmp_path, _PUBLIC=public)
    assert args[-1] == access
    assert [arg for arg in args if "allow-unauthenticated" in arg] == [access]
    assert env_vars(args)["EVENT_AUTH"] == event_auth


@pytest.mark.parametrize("public", ["yes", "True", "", "--allow-unauthenticated"])
def test_an_unknown_access_choice_deploys_nothing(
    build: dict[str, Any], tmp_path: Path, public: str
) -> None:
    for step_id in ("check", "deploy"):
        run = run_step(build, step_id, tmp_path, _PUBLIC=public)
        assert run.returncode != 0, step_id
        assert "_PUBLIC must be true or false" in run.stderr
        assert run.gcloud_calls == []


def test_access_is_chosen_only_through_public(build: dict[str, Any]) -> None:
    assert build["substitutions"]["_PUBLIC"] in {"true", "false"}
    assert not any("INVOKER" in key or "AUTH" in key for key in build["substitutions"])
    assert all("EVENT_AUTH=oidc" not in text for text in strings(build))
    assert all("EVENT_AUTH=iam" not in text for text in strings(build))


@pytest.mark.parametrize("version", ["latest", "", "0", "1.0", "3 ", "projects/p/secrets/s"])
def test_a_secret_version_that_is_not_a_number_fails_the_build_early(
    build: dict[str, Any], tmp_path: Path, version: str
) -> None:
    run = run_step(build, "check", tmp_path, _SENDGRID_SECRET_VERSION=version)
    assert run.returncode == 1
    assert "_SENDGRID_SECRET_VERSION must be a version number" in run.stderr
    assert run.gcloud_calls == []


def test_the_default_settings_with_a_version_pass_the_check(
    build: dict[str, Any], tmp_path: Path
) -> None:
    run = run_step(build, "check", tmp_path)
    assert (run.returncode, run.stderr) == (0, "")
    assert run.gcloud_calls == []


def test_notify_to_keeps_its_commas(build: dict[str, Any], tmp_path: Path) -> None:
    recipients = "alice@example.com,bob@example.com"
    assert env_vars(deploy_args(build, tmp_path, _NOTIFY_TO=recipients))["NOTIFY_TO"] == (
        recipients
    )


def test_substitution_values_reach_gcloud_as_data(build: dict[str, Any], tmp_path: Path) -> None:
    hostile = "\"Ops\" <ops@example.com>,$(touch pwned) `touch pwned2` $HOME 'x'"
    args = deploy_args(build, tmp_path, _NOTIFY_FROM=hostile)
    assert env_vars(args)["NOTIFY_FROM"] == hostile
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pwned2").exists()


def test_the_default_store_is_firestore_shared_by_ten_instances(
    build: dict[str, Any], tmp_path: Path
) -> None:
    args = deploy_args(build, tmp_path)
    settings = env_vars(args)
    # No project in the URL: the service takes GOOGLE_CLOUD_PROJECT, this build's project.
    assert settings["IDEMPOTENCY_STORE"] == "firestore:///gcs-notifier?prefix=gcs-notifier"
    assert settings["GOOGLE_CLOUD_PROJECT"] == LOCAL_SUBMIT["PROJECT_ID"]
    # The service-level cap holds across revisions; a revision's own may briefly be exceeded.
    assert flag(args, "--max") == "10"
    assert flag(args, "--max-instances") == "10"


SQLITE = "sqlite:////tmp/gcs-notifier/state/notifier.db"


def test_more_than_one_instance_needs_a_shared_store(build: dict[str, Any], tmp_path: Path) -> None:
    run = run_step(build, "check", tmp_path, _IDEMPOTENCY_STORE=SQLITE)
    assert run.returncode == 1
    assert "_MAX_INSTANCES=10 with the SQLite store" in run.stderr
    assert run.gcloud_calls == []
    alone = {"_IDEMPOTENCY_STORE": SQLITE, "_MAX_INSTANCES": "1"}
    assert run_step(build, "check", tmp_path, **alone) == StepRun(0, "", [])
    args = deploy_args(build, tmp_path, **alone)
    assert flag(args, "--max") == flag(args, "--max-instances") == "1"
    for store in ("redis://10.0.0.3:6379/0", "firestore://other-project/notes?prefix=mail"):
        assert run_step(build, "check", tmp_path, _MAX_INSTANCES="3", _IDEMPOTENCY_STORE=store) == (
            StepRun(0, "", [])
        )
        args = deploy_args(build, tmp_path, _MAX_INSTANCES="3", _IDEMPOTENCY_STORE=store)
        assert flag(args, "--max") == flag(args, "--max-instances") == "3"
        assert env_vars(args)["IDEMPOTENCY_STORE"] == store


@pytest.mark.parametrize(
    "store", ["memory", "", "mysql://db/notifier", "firestore:gcs-notifier", "sqlite:x.db"]
)
def test_a_store_the_service_cannot_share_or_open_fails_the_build_early(
    build: dict[str, Any], tmp_path: Path, store: str
) -> None:
    run = run_step(build, "check", tmp_path, _IDEMPOTENCY_STORE=store, _MAX_INSTANCES="1")
    assert run.returncode == 1
    assert "_IDEMPOTENCY_STORE must be firestore://" in run.stderr
    assert run.gcloud_calls == []


def test_cpu_is_billed_per_request_with_a_start_up_boost(
    build: dict[str, Any], tmp_path: Path
) -> None:
    args = deploy_args(build, tmp_path)
    assert "--cpu-throttling" in args
    assert "--no-cpu-throttling" not in args
    assert "--cpu-boost" in args
    # A flush of the service's own timer, frozen between requests, would wake with its claims
    # lost: Cloud Scheduler keeps time instead.
    assert env_vars(args)["DIGEST_FLUSH_SECONDS"] == "0"


def test_cloud_build_and_terraform_deploy_the_same_service(
    build: dict[str, Any], tmp_path: Path
) -> None:
    tf = load_terraform()
    variables = blocks(tf, "variable")
    subs = build["substitutions"]
    service_name = variables["service"]["default"]
    assert subs["_SERVICE"] == service_name
    assert subs["_REGION"] == variables["region"]["default"]
    assert subs["_SENDGRID_SECRET"] == variables["sendgrid_secret"]["default"]
    # Both pin a version the operator names: neither has one to fall back to.
    assert "default" not in variables["sendgrid_secret_version"]
    assert subs["_SENDGRID_SECRET_VERSION"] == ""
    assert subs["_PUBLIC"] == str(variables["public_datetime"]["default"]).lower()
    accounts = {
        body["account_id"].replace("${var.service}", service_name)
        for body in of_type(tf, "google_service_account").values()
    }
    assert {subs["_RUNTIME_SA"], subs["_TRIGGER_SA"]} == accounts
    (service,) = of_type(tf, "google_cloud_run_v2_service").values()
    template = single(service["template"])
    containers = single(template["containers"])
    terraform_env = {entry["name"] for entry in containers["env"]}
    terraform_rules_env = {content["name"] for _, content in dynamic(containers, "env")}
    for rules, expected in (({}, terraform_env), (RULES, terraform_env | terraform_rules_env)):
        args = deploy_args(build, tmp_path, **rules)
        secret_env = {key for key in secrets(args) if not key.startswith("/")}
        # Else each deploy would fight the other's drift.
        assert set(env_vars(args)) | secret_env == expected, rules
    args = deploy_args(build, tmp_path)
    assert int(flag(args, "--concurrency")) == template["max_instance_request_concurrency"]
    # The same Firestore database and collections: Terraform names the project, Cloud Build
    # leaves it to GOOGLE_CLOUD_PROJECT, this build's project.
    (database,) = of_type(tf, "google_firestore_database").values()
    assert database["name"] == "${var.firestore_database}"
    assert locals_(tf)["firestore_url"] == (
        "firestore://${var.project}/${google_firestore_database.store.name}"
        "?prefix=${var.store_prefix}"
    )
    assert env_vars(args)["IDEMPOTENCY_STORE"] == (
        f"firestore:///{variables['firestore_database']['default']}"
        f"?prefix={variables['store_prefix']['default']}"
    )
    assert variables["idempotency_store"]["default"] == ""
    assert variables["redis_url"]["default"] == ""
    assert int(flag(args, "--max")) == variables["max_instances"]["default"]
    resources_ = single(containers["resources"])
    assert flag(args, "--cpu") == resources_["limits"]["cpu"]
    assert flag(args, "--memory") == resources_["limits"]["memory"]
    assert ("--cpu-throttling" in args) == resources_["cpu_idle"]
    timer = {entry["name"]: entry.get("value") for entry in containers["env"]}
    assert env_vars(args)["DIGEST_FLUSH_SECONDS"] == timer["DIGEST_FLUSH_SECONDS"] == "0"
    assert ("--cpu-boost" in args) == resources_["startup_cpu_boost"]
    assert flag(args, "--timeout") == template["timeout"]


def test_both_files_pair_event_auth_with_access_the_same_way(
    build: dict[str, Any], tmp_path: Path
) -> None:
    tf = load_terraform()
    (service,) = of_type(tf, "google_cloud_run_v2_service").values()
    containers = single(single(service["template"])["containers"])
    terraform_auth = {entry["name"]: entry for entry in containers["env"]}["EVENT_AUTH"]["value"]
    (public_grant,) = [body for body in resources(tf).values() if body.get("member") == "allUsers"]
    match = re.fullmatch(r'\$\{var\.public_datetime \? "(\w+)" : "(\w+)"\}', terraform_auth)
    assert match, terraform_auth
    assert public_grant["count"] == "${var.public_datetime ? 1 : 0}"
    for public, terraform_value in ((True, match[1]), (False, match[2])):
        args = deploy_args(build, tmp_path, _PUBLIC=str(public).lower())
        assert env_vars(args)["EVENT_AUTH"] == terraform_value
        assert ("--allow-unauthenticated" in args) == public


def test_both_files_derive_the_same_event_audience(build: dict[str, Any], tmp_path: Path) -> None:
    tf = load_terraform()
    variables = blocks(tf, "variable")
    terraform_audience = (
        locals_(tf)["event_audience"]
        .replace("${var.service}", variables["service"]["default"])
        .replace("${var.region}", variables["region"]["default"])
        .replace("${data.google_project.this.number}", LOCAL_SUBMIT["PROJECT_NUMBER"])
    )
    assert env_vars(deploy_args(build, tmp_path))["EVENT_AUDIENCE"] == terraform_audience


# --------------------------------------------------------------------------------------------
# The routing rules file (NOTIFY_RULES) from Secret Manager, mounted as a file
# --------------------------------------------------------------------------------------------

RULES = {"_RULES_SECRET": "notify-rules", "_RULES_SECRET_VERSION": "2"}


def mounted_files(args: list[str]) -> dict[str, str]:
    return {key: value for key, value in secrets(args).items() if key.startswith("/")}


def test_without_a_rules_secret_no_file_is_mounted_and_notify_rules_is_unset(
    build: dict[str, Any], tmp_path: Path
) -> None:
    args = deploy_args(build, tmp_path)
    assert mounted_files(args) == {}
    assert "NOTIFY_RULES" not in env_vars(args)
    # A rules file mounted by an earlier deploy goes too; --set-env-vars already drops the rest.
    (rules_file,) = removed_secrets(args)
    assert rules_file == "/etc/gcs-notifier/rules.yaml"


def test_a_rules_secret_is_mounted_as_the_file_notify_rules_names(
    build: dict[str, Any], tmp_path: Path
) -> None:
    args = deploy_args(build, tmp_path, **RULES)
    assert mounted_files(args) == {"/etc/gcs-notifier/rules.yaml": "notify-rules:2"}
    assert env_vars(args)["NOTIFY_RULES"] == "/etc/gcs-notifier/rules.yaml"
    assert removed_secrets(args) == []
    assert secrets(args)["SENDGRID_API_KEY"] == "sendgrid-api-key:3", "the key stays"


def test_the_rules_file_is_a_path_gcloud_mounts(build: dict[str, Any], tmp_path: Path) -> None:
    # gcloud: a key starting with "/" is a mount path, in the form /<folder>/<file>, with no
    # empty, "." or ".." segment; the folder holds this one secret (one secret per folder).
    (path,) = mounted_files(deploy_args(build, tmp_path, **RULES))
    segments = path.split("/")
    assert len(segments) >= 3
    assert not {"", ".", ".."} & set(segments[1:])
    assert path.rsplit("/", 1)[0] not in {"/tmp", "/etc", "/app", "/home"}, "would hide a folder"


def test_secrets_are_updated_so_terraforms_rules_volume_keeps_its_name(
    build: dict[str, Any], tmp_path: Path
) -> None:
    # gcloud's --set-secrets drops every mount first and names each new volume at random, so
    # each deploy would rename Terraform's "rules" volume and each apply rename it back, starting
    # a revision; --update-secrets keeps the volume already mounted at the folder, name and all.
    for rules in ({}, RULES):
        args = deploy_args(build, tmp_path, **rules)
        assert not [arg for arg in args if arg.startswith(("--set-secrets", "--clear-secrets"))]
        assert len([arg for arg in args if arg.startswith("--update-secrets=")]) == 1


@pytest.mark.parametrize("version", ["latest", "", "0", "01", "2.0", "2 ", "projects/p/secrets/s"])
def test_a_rules_version_that_is_not_a_number_fails_the_build_early(
    build: dict[str, Any], tmp_path: Path, version: str
) -> None:
    run = run_step(build, "check", tmp_path, **{**RULES, "_RULES_SECRET_VERSION": version})
    assert run.returncode == 1
    assert "_RULES_SECRET_VERSION must be a version number of notify-rules" in run.stderr
    assert run.gcloud_calls == []


def test_a_rules_version_without_a_rules_secret_fails_the_build_early(
    build: dict[str, Any], tmp_path: Path
) -> None:
    run = run_step(build, "check", tmp_path, _RULES_SECRET_VERSION="2")
    assert run.returncode == 1
    assert "_RULES_SECRET_VERSION=2 without _RULES_SECRET" in run.stderr


@pytest.mark.parametrize(
    "secret", ["notify-rules:2", "projects/p/secrets/notify-rules", "a,b", "a b", "$(id)"]
)
def test_a_rules_secret_that_is_not_a_secret_id_fails_the_build_early(
    build: dict[str, Any], tmp_path: Path, secret: str
) -> None:
    run = run_step(build, "check", tmp_path, **{**RULES, "_RULES_SECRET": secret})
    assert run.returncode == 1
    assert "_RULES_SECRET must be a secret ID" in run.stderr


def test_a_rules_secret_with_its_version_passes_the_check(
    build: dict[str, Any], tmp_path: Path
) -> None:
    assert run_step(build, "check", tmp_path, **RULES) == StepRun(0, "", [])


def test_both_files_mount_the_rules_file_at_the_same_path(
    build: dict[str, Any], tmp_path: Path
) -> None:
    tf = load_terraform()
    (service,) = of_type(tf, "google_cloud_run_v2_service").values()
    template = single(service["template"])
    containers = single(template["containers"])
    ((_, volume),) = dynamic(template, "volumes")
    ((_, mount),) = dynamic(containers, "volume_mounts")
    ((_, variable),) = dynamic(containers, "env")
    item = single(single(volume["secret"])["items"])
    terraform_file = with_locals(tf, mount["mount_path"]) + "/" + with_locals(tf, item["path"])
    args = deploy_args(build, tmp_path, **RULES)
    (cloud_build_file,) = mounted_files(args)
    assert terraform_file == cloud_build_file
    assert with_locals(tf, variable["value"]) == env_vars(args)["NOTIFY_RULES"] == terraform_file
    variables = blocks(tf, "variable")
    subs = build["substitutions"]
    assert subs["_RULES_SECRET"] == variables["rules_secret"]["default"] == ""
    assert subs["_RULES_SECRET_VERSION"] == variables["rules_secret_version"]["default"] == ""


@pytest.mark.parametrize("version", ["1", "2", "27", "latest", "0", "01", "2.0", "2 ", "-1"])
def test_both_files_pin_the_rules_version_by_the_same_rule(
    build: dict[str, Any], tmp_path: Path, version: str
) -> None:
    terraform_accepts = version_rule(load_terraform(), "rules_secret_version")(version)
    run = run_step(build, "check", tmp_path, **{**RULES, "_RULES_SECRET_VERSION": version})
    assert (run.returncode == 0) == terraform_accepts
