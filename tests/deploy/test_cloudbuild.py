"""cloudbuild.yaml, checked the way Cloud Build reads it, with the values `gcloud builds submit`
gives the built-in substitutions when it uploads a local folder: no commit, no branch.

Rules from Cloud Build's "Substituting variable values": user substitutions match `_[A-Z0-9_]+`,
a `$$` is a literal `$` (a bash variable of the step), and by default (substitution_option
MUST_MATCH) a build fails if it references an undefined substitution or defines an unused one.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.deploy.artifacts import (
    BUILTIN_SUBSTITUTIONS,
    blocks,
    dockerfile_stages,
    load_cloudbuild,
    load_terraform,
    locals_,
    of_type,
    single,
    strings,
    substitute,
    substitution_references,
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


def deploy_args(build: dict[str, Any]) -> list[str]:
    (deploy,) = [
        step
        for step in build["steps"]
        if step.get("entrypoint") == "gcloud" and step["args"][:2] == ["run", "deploy"]
    ]
    return resolved_args(build, deploy["id"])


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


def test_user_substitutions_are_underscored_with_defaults_and_shadow_no_builtin(
    build: dict[str, Any],
) -> None:
    for key, value in build["substitutions"].items():
        assert re.fullmatch(r"_[A-Z0-9_]+", key), key
        assert key[1:] not in BUILTIN_SUBSTITUTIONS, f"{key} reads like the built-in ${key[1:]}"
        assert isinstance(value, str), f"{key}: quote it, Cloud Build substitutions are strings"
        assert value, f"{key} has no default"
        assert "$" not in value, f"{key}: defaults are not substituted (no dynamic substitutions)"


def test_cloud_run_region_is_ours_not_the_build_location(build: dict[str, Any]) -> None:
    body = {key: value for key, value in build.items() if key != "substitutions"}
    referenced = {name for text in strings(body) for name in substitution_references(text)}
    assert "LOCATION" not in referenced  # $LOCATION is where the build runs


def test_image_references_are_complete_under_gcloud_builds_submit(build: dict[str, Any]) -> None:
    values = defaults(build)
    references = [substitute(image, values) for image in build["images"]]
    for step in build["steps"]:
        args = [substitute(arg, values) for arg in step.get("args", [])]
        references += [
            arg.partition("=")[2] for arg in args if arg.startswith(("--tag=", "--image="))
        ]
        references += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in {"-t", "--tag"}]
        if step["name"].endswith("/docker") and args[:1] == ["push"]:
            references.append(args[1])
    assert len(references) >= 4
    for reference in references:
        assert "//" not in reference, reference
        assert ARTIFACT_REGISTRY_IMAGE.match(reference), reference


def test_a_commit_based_tag_would_be_caught(build: dict[str, Any]) -> None:
    values = defaults(build)
    broken = substitute(build["images"][0].rsplit(":", 1)[0] + ":$SHORT_SHA", values)
    assert not ARTIFACT_REGISTRY_IMAGE.match(broken)


def test_deployed_image_is_the_built_pushed_and_listed_image(build: dict[str, Any]) -> None:
    values = defaults(build)
    (listed,) = [substitute(image, values) for image in build["images"]]
    built = flag(resolved_args(build, "build"), "--tag")
    pushed = resolved_args(build, "push")
    assert pushed[0] == "push"
    assert built == pushed[1] == flag(deploy_args(build), "--image") == listed
    assert listed.endswith(":" + LOCAL_SUBMIT["BUILD_ID"])


def test_tests_run_before_the_image_is_built(build: dict[str, Any]) -> None:
    steps = build["steps"]
    ids = [step["id"] for step in steps]

    def prerequisites(index: int) -> set[str]:
        wait_for = steps[index].get("waitFor")
        if wait_for is None:  # Cloud Build: no waitFor means after every earlier step
            direct = set(ids[:index])
        elif wait_for == ["-"]:  # "-" means at the start of the build
            direct = set()
        else:
            direct = set(wait_for)
        return direct | {earlier for name in direct for earlier in prerequisites(ids.index(name))}

    build_index = ids.index("build")
    assert steps[build_index]["name"] == "gcr.io/cloud-builders/docker"
    assert "test" in prerequisites(build_index)
    assert "build" in prerequisites(ids.index("deploy"))
    assert "push" in prerequisites(ids.index("deploy"))
    test_command = " ".join(steps_by_id(build)["test"]["args"])
    assert "python -m pytest" in test_command
    assert "-r requirements-dev.txt" in test_command


def test_tests_run_on_the_python_of_the_image(build: dict[str, Any]) -> None:
    test_image = steps_by_id(build)["test"]["name"]
    assert test_image == dockerfile_stages()[-1].base


def test_deploy_sets_identity_secret_and_settings(build: dict[str, Any]) -> None:
    args = deploy_args(build)
    project = LOCAL_SUBMIT["PROJECT_ID"]
    subs = build["substitutions"]
    runtime = f"{subs['_RUNTIME_SA']}@{project}.iam.gserviceaccount.com"
    trigger = f"{subs['_TRIGGER_SA']}@{project}.iam.gserviceaccount.com"
    assert flag(args, "--service-account") == runtime
    assert flag(args, "--region") == subs["_REGION"]
    assert flag(args, "--set-secrets") == (
        f"SENDGRID_API_KEY={subs['_SENDGRID_SECRET']}:{subs['_SENDGRID_SECRET_VERSION']}"
    )
    assert flag(args, "--concurrency") == "80"
    settings = env_vars(args)
    assert settings["NOTIFIER"] == "sendgrid"
    assert settings["EVENT_AUTH"] == "oidc"
    assert settings["EVENT_INVOKERS"] == trigger
    assert settings["NOTIFY_TO"] == subs["_NOTIFY_TO"]
    assert settings["NOTIFY_FROM"] == subs["_NOTIFY_FROM"]
    assert settings["GOOGLE_CLOUD_PROJECT"] == project
    assert "SENDGRID_API_KEY" not in settings, "the key comes from Secret Manager only"
    assert "PORT" not in settings, "Cloud Run sets PORT itself and rejects it"


def test_notify_to_keeps_its_commas(build: dict[str, Any]) -> None:
    recipients = "alice@example.com,bob@example.com"
    values = {**defaults(build), "_NOTIFY_TO": recipients}
    (deploy,) = [step for step in build["steps"] if step["id"] == "deploy"]
    args = [substitute(arg, values) for arg in deploy["args"]]
    assert env_vars(args)["NOTIFY_TO"] == recipients


def test_one_instance_while_deduplication_is_per_instance(build: dict[str, Any]) -> None:
    args = deploy_args(build)
    assert env_vars(args)["IDEMPOTENCY_STORE"].startswith("sqlite:////tmp/")
    assert flag(args, "--max-instances") == "1"


def test_unauthenticated_access_only_with_oidc_event_auth(build: dict[str, Any]) -> None:
    assert build["substitutions"]["_INVOKER_ACCESS"] in {
        "--allow-unauthenticated",
        "--no-allow-unauthenticated",
    }
    for access in ("--allow-unauthenticated", "--no-allow-unauthenticated"):
        values = {**defaults(build), "_INVOKER_ACCESS": access}
        (deploy,) = [step for step in build["steps"] if step["id"] == "deploy"]
        args = [substitute(arg, values) for arg in deploy["args"]]
        if "--allow-unauthenticated" in args:
            assert env_vars(args)["EVENT_AUTH"] == "oidc"
    everything = "\n".join(strings(build))
    assert everything.count("--allow-unauthenticated") == 1


def test_deploy_arguments_survive_the_shell_unchanged(build: dict[str, Any]) -> None:
    # The gcloud entrypoint gets each arg as one argv entry: no arg may rely on shell splitting.
    for arg in deploy_args(build)[2:]:
        assert shlex.split(arg) == [arg], arg


def test_cloud_build_and_terraform_deploy_the_same_service(build: dict[str, Any]) -> None:
    tf = load_terraform()
    variables = blocks(tf, "variable")
    subs = build["substitutions"]
    service_name = variables["service"]["default"]
    assert subs["_SERVICE"] == service_name
    assert subs["_REGION"] == variables["region"]["default"]
    assert subs["_SENDGRID_SECRET"] == variables["sendgrid_secret"]["default"]
    assert subs["_SENDGRID_SECRET_VERSION"] == variables["sendgrid_secret_version"]["default"]
    accounts = {
        body["account_id"].replace("${var.service}", service_name)
        for body in of_type(tf, "google_service_account").values()
    }
    assert {subs["_RUNTIME_SA"], subs["_TRIGGER_SA"]} == accounts
    (service,) = of_type(tf, "google_cloud_run_v2_service").values()
    template = single(service["template"])
    containers = single(template["containers"])
    terraform_env = {entry["name"] for entry in containers["env"]}
    args = deploy_args(build)
    cloud_build_env = set(env_vars(args)) | {flag(args, "--set-secrets").partition("=")[0]}
    assert cloud_build_env == terraform_env  # else each deploy would fight the other's drift
    assert int(flag(args, "--concurrency")) == template["max_instance_request_concurrency"]
    assert locals_(tf)["idempotency_store"].count(env_vars(args)["IDEMPOTENCY_STORE"]) == 1
    limits = single(containers["resources"])["limits"]
    assert flag(args, "--cpu") == limits["cpu"]
    assert flag(args, "--memory") == limits["memory"]
    assert flag(args, "--timeout") == template["timeout"]
