"""eventarc.tf, parsed with python-hcl2: the wiring from a bucket to the service, checked offline.

No Terraform binary or provider download is possible here, so the tests hold the configuration to
the hashicorp/google provider's documented argument names (DOCUMENTED below) and to the IAM grants
Eventarc needs for Cloud Storage events (Eventarc docs, "Route Cloud Storage events to Cloud Run").
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.deploy.artifacts import (
    ROOT,
    blocks,
    dynamic,
    load_terraform,
    load_terraform_lock,
    locals_,
    of_type,
    resources,
    single,
    strings,
    version_rule,
    with_locals,
)

STORAGE_EVENT_TYPES = {
    "google.cloud.storage.object.v1.finalized",
    "google.cloud.storage.object.v1.deleted",
    "google.cloud.storage.object.v1.archived",
    "google.cloud.storage.object.v1.metadataUpdated",
}

REQUIRED_APIS = {
    "eventarc.googleapis.com",
    "monitoring.googleapis.com",
    "run.googleapis.com",
    "pubsub.googleapis.com",
    "storage.googleapis.com",
    "secretmanager.googleapis.com",
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudscheduler.googleapis.com",
    "firestore.googleapis.com",
}

Schema = dict[str, "Schema | None"]  # None: an attribute; a dict: a nested block

_IAM_CONDITION: Schema = {"title": None, "description": None, "expression": None}
_PROBE: Schema = {
    "initial_delay_seconds": None,
    "timeout_seconds": None,
    "period_seconds": None,
    "failure_threshold": None,
    "http_get": {"path": None, "port": None, "http_headers": {"name": None, "value": None}},
    "tcp_socket": {"port": None},
    "grpc": {"port": None, "service": None},
}

# Arguments of the resources this configuration uses, from the hashicorp/google provider docs
# (6.x/7.x); a misspelt or invented argument fails here instead of at `terraform plan`.
DOCUMENTED: dict[str, Schema] = {
    "google_project_service": {
        "project": None,
        "service": None,
        "disable_on_destroy": None,
        "disable_dependent_services": None,
        "check_if_service_has_usage_on_destroy": None,
    },
    "google_service_account": {
        "account_id": None,
        "display_name": None,
        "description": None,
        "disabled": None,
        "project": None,
        "create_ignore_already_exists": None,
    },
    "google_project_iam_member": {
        "project": None,
        "role": None,
        "member": None,
        "condition": _IAM_CONDITION,
    },
    "google_service_account_iam_member": {
        "service_account_id": None,
        "role": None,
        "member": None,
        "condition": _IAM_CONDITION,
    },
    "google_secret_manager_secret_iam_member": {
        "project": None,
        "secret_id": None,
        "role": None,
        "member": None,
        "condition": _IAM_CONDITION,
    },
    "google_cloud_run_v2_service_iam_member": {
        "project": None,
        "location": None,
        "name": None,
        "role": None,
        "member": None,
        "condition": _IAM_CONDITION,
    },
    "google_cloud_run_v2_service": {
        "name": None,
        "location": None,
        "project": None,
        "description": None,
        "labels": None,
        "annotations": None,
        "client": None,
        "client_version": None,
        "ingress": None,
        "launch_stage": None,
        "custom_audiences": None,
        "default_uri_disabled": None,
        "invoker_iam_disabled": None,
        "deletion_protection": None,
        "scaling": {
            "min_instance_count": None,
            "max_instance_count": None,
            "scaling_mode": None,
            "manual_instance_count": None,
        },
        "traffic": {"type": None, "revision": None, "percent": None, "tag": None},
        "template": {
            "revision": None,
            "labels": None,
            "annotations": None,
            "timeout": None,
            "service_account": None,
            "execution_environment": None,
            "encryption_key": None,
            "max_instance_request_concurrency": None,
            "session_affinity": None,
            "health_check_disabled": None,
            "scaling": {"min_instance_count": None, "max_instance_count": None},
            "volumes": {
                "name": None,
                "secret": {
                    "secret": None,
                    "default_mode": None,
                    "items": {"path": None, "version": None, "mode": None},
                },
            },
            "vpc_access": {
                "connector": None,
                "egress": None,
                "network_interfaces": {"network": None, "subnetwork": None, "tags": None},
            },
            "containers": {
                "name": None,
                "image": None,
                "command": None,
                "args": None,
                "working_dir": None,
                "depends_on": None,
                "env": {
                    "name": None,
                    "value": None,
                    "value_source": {"secret_key_ref": {"secret": None, "version": None}},
                },
                "resources": {"limits": None, "cpu_idle": None, "startup_cpu_boost": None},
                "ports": {"name": None, "container_port": None},
                "volume_mounts": {"name": None, "mount_path": None},
                "startup_probe": _PROBE,
                "liveness_probe": _PROBE,
            },
        },
    },
    "google_eventarc_trigger": {
        "name": None,
        "location": None,
        "project": None,
        "service_account": None,
        "labels": None,
        "channel": None,
        "event_data_content_type": None,
        "matching_criteria": {"attribute": None, "value": None, "operator": None},
        "destination": {
            "cloud_run_service": {"service": None, "region": None, "path": None},
            "cloud_function": None,
            "workflow": None,
        },
        "transport": {"pubsub": {"topic": None}},
    },
    "google_monitoring_alert_policy": {
        "display_name": None,
        "combiner": None,
        "enabled": None,
        "notification_channels": None,
        "alert_strategy": {"auto_close": None, "notification_rate_limit": {"period": None}},
        "user_labels": None,
        "severity": None,
        "project": None,
        "documentation": {"content": None, "mime_type": None, "subject": None},
        "conditions": {
            "display_name": None,
            "condition_threshold": {
                "filter": None,
                "comparison": None,
                "threshold_value": None,
                "duration": None,
                "evaluation_missing_data": None,
                "trigger": {"count": None, "percent": None},
                "aggregations": {
                    "alignment_period": None,
                    "per_series_aligner": None,
                    "cross_series_reducer": None,
                    "group_by_fields": None,
                },
            },
        },
    },
    "google_cloud_scheduler_job": {
        "name": None,
        "description": None,
        "schedule": None,
        "time_zone": None,
        "paused": None,
        "attempt_deadline": None,
        "region": None,
        "project": None,
        "retry_config": {
            "retry_count": None,
            "max_retry_duration": None,
            "min_backoff_duration": None,
            "max_backoff_duration": None,
            "max_doublings": None,
        },
        "http_target": {
            "uri": None,
            "http_method": None,
            "body": None,
            "headers": None,
            "oauth_token": {"service_account_email": None, "scope": None},
            "oidc_token": {"service_account_email": None, "audience": None},
        },
        "pubsub_target": {"topic_name": None, "data": None, "attributes": None},
        "app_engine_http_target": None,
    },
    "google_pubsub_topic": {
        "name": None,
        "project": None,
        "labels": None,
        "kms_key_name": None,
        "message_retention_duration": None,
        "message_storage_policy": {"allowed_persistence_regions": None, "enforce_in_transit": None},
        "schema_settings": {"schema": None, "encoding": None},
    },
    "google_pubsub_subscription": {
        "name": None,
        "topic": None,
        "project": None,
        "labels": None,
        "ack_deadline_seconds": None,
        "message_retention_duration": None,
        "retain_acked_messages": None,
        "filter": None,
        "enable_message_ordering": None,
        "enable_exactly_once_delivery": None,
        "expiration_policy": {"ttl": None},
        "retry_policy": {"minimum_backoff": None, "maximum_backoff": None},
        "dead_letter_policy": {"dead_letter_topic": None, "max_delivery_attempts": None},
        "push_config": {
            "push_endpoint": None,
            "attributes": None,
            "oidc_token": {"service_account_email": None, "audience": None},
            "no_wrapper": {"write_metadata": None},
        },
        "bigquery_config": None,
        "cloud_storage_config": None,
    },
    "google_pubsub_topic_iam_member": {
        "topic": None,
        "project": None,
        "role": None,
        "member": None,
        "condition": _IAM_CONDITION,
    },
    "google_pubsub_subscription_iam_member": {
        "subscription": None,
        "project": None,
        "role": None,
        "member": None,
        "condition": _IAM_CONDITION,
    },
    "google_storage_notification": {
        "bucket": None,
        "payload_format": None,
        "topic": None,
        "custom_attributes": None,
        "event_types": None,
        "object_name_prefix": None,
    },
    "google_firestore_database": {
        "name": None,
        "location_id": None,
        "type": None,
        "project": None,
        "concurrency_mode": None,
        "app_engine_integration_mode": None,
        "point_in_time_recovery_enablement": None,
        "delete_protection_state": None,
        "deletion_policy": None,
        "database_edition": None,
        "cmek_config": {"kms_key_name": None},
        "tags": None,
    },
    "google_firestore_field": {
        "collection": None,
        "field": None,
        "database": None,
        "project": None,
        "ttl_config": {},
        "index_config": {
            "indexes": {"query_scope": None, "order": None, "array_config": None},
        },
    },
    "google_firestore_index": {
        "collection": None,
        "database": None,
        "project": None,
        "query_scope": None,
        "api_scope": None,
        "density": None,
        "multikey": None,
        "fields": {"field_path": None, "order": None, "array_config": None, "vector_config": None},
    },
    "data.google_project": {"project_id": None},
    "data.google_storage_bucket": {"name": None, "project": None},
    "data.google_storage_project_service_account": {"project": None, "user_project": None},
}

META_ARGUMENTS = {"count", "for_each", "depends_on", "lifecycle", "provider"}


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return load_terraform()


def only(found: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    assert len(found) == 1, sorted(found)
    return next(iter(found.items()))


def service(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return only(of_type(tf, "google_cloud_run_v2_service"))


def container(tf: dict[str, Any]) -> dict[str, Any]:
    _, body = service(tf)
    containers = single(body["template"])["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env(tf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container(tf)["env"]}


def account_email(tf: dict[str, Any], role_of: str) -> str:
    """`${google_service_account.X.email}` of the service account whose name says `role_of`."""
    accounts = of_type(tf, "google_service_account")
    matching = [address for address in accounts if role_of in address.split(".")[1]]
    assert len(matching) == 1, (role_of, sorted(accounts))
    return "${" + matching[0] + ".email}"


def grants(tf: dict[str, Any], type_name: str, role: str) -> dict[str, dict[str, Any]]:
    return {
        address: body
        for address, body in of_type(tf, type_name).items()
        if body.get("role") == role
    }


def conditional(expression: str) -> tuple[str, Any, Any]:
    """`${var.NAME ? A : B}` -> (NAME, A, B), A and B as Python values (strings or integers)."""
    match = re.fullmatch(r'\$\{var\.(\w+) \? ("\w*"|\d+) : ("\w*"|\d+)\}', expression)
    assert match, expression

    def value(text: str) -> Any:
        return text.strip('"') if text.startswith('"') else int(text)

    return match[1], value(match[2]), value(match[3])


def evaluate(expression: str, variables: dict[str, Any]) -> Any:
    """A `var.NAME ? A : B` conditional under the given variable values."""
    name, if_true, if_false = conditional(expression)
    return if_true if variables[name] else if_false


DELIVERIES = ("eventarc", "pubsub")

_TOKEN = re.compile(
    r'\s*(?:(?P<string>"[^"\\]*")|(?P<number>\d+)|(?P<name>(?:var|local)\.\w+)'
    r"|(?P<function>(?:coalesce|startswith)(?=\())"
    r"|(?P<op>==|!=|&&|\|\||!|\?|:|\(|\)|,|\{\}|\[\]|true\b|false\b|null\b))"
)
_PYTHON_OPERATORS = {"&&": "and", "||": "or", "!": "not", "true": "True", "false": "False"}


def _coalesce(*values: Any) -> Any:
    """Terraform's coalesce: the first argument that is neither null nor an empty string."""
    found = [item for item in values if item is not None and item != ""]
    assert found, "coalesce fails when every argument is null or empty"
    return found[0]


def _startswith(text: str, prefix: str) -> bool:
    return text.startswith(prefix)


_FUNCTIONS = {"coalesce": _coalesce, "startswith": _startswith}


def value(tf: dict[str, Any], expression: str, variables: dict[str, Any]) -> Any:
    """A count or for_each expression of this file under the given variables, as Terraform would
    compute it: var. and local. references (locals computed in turn), string and number literals,
    null, {} and [], ==, !=, &&, ||, ! and parentheses, coalesce() and startswith(), and one
    `CONDITION ? A : B`. Anything else fails, so an expression these tests cannot read is never
    silently taken as true. A local that is a string template (not a whole `${...}` expression)
    is returned as written, for `rendered` below."""
    match = re.fullmatch(r"\$\{(.*)\}", expression, re.S)
    assert match, expression
    text, position = match[1].rstrip(), 0
    words: list[str] = []
    names: dict[str, Any] = {}
    while position < len(text):
        token = _TOKEN.match(text, position)
        assert token, (text, position)
        position = token.end()
        if token["string"] is not None:
            words.append(repr(token["string"][1:-1]))
        elif token["number"] is not None:
            words.append(token["number"])
        elif token["function"] is not None:
            names[f"_{len(names)}"] = _FUNCTIONS[token["function"]]
            words.append(f"_{len(names) - 1}")
        elif token["name"] is not None:
            kind, _, name = token["name"].partition(".")
            if kind == "var":
                resolved = variables[name]
            else:
                local = locals_(tf)[name]
                is_expression = isinstance(local, str) and local.startswith("${")
                resolved = value(tf, local, variables) if is_expression else local
            names[f"_{len(names)}"] = resolved
            words.append(f"_{len(names) - 1}")
        else:
            op = token["op"]
            words.append("None" if op == "null" else _PYTHON_OPERATORS.get(op, op))
    if "?" in words:
        question = words.index("?")
        colon = words.index(":", question)
        assert "?" not in words[question + 1 :], "one conditional only"
        condition, if_true, if_false = (
            " ".join(words[:question]),
            " ".join(words[question + 1 : colon]),
            " ".join(words[colon + 1 :]),
        )
        python = f"({if_true}) if ({condition}) else ({if_false})"
    else:
        python = " ".join(words)
    # Only the tokens above reach eval: names, literals and operators, no calls or attributes.
    return eval(python, {"__builtins__": {}}, names)


def test_value_computes_terraform_conditionals() -> None:
    tf: dict[str, Any] = {"locals": [{"on": '${var.mode == "a"}', "items": {"k": "v"}}]}
    assert value(tf, "${local.on ? 1 : 0}", {"mode": "a"}) == 1
    assert value(tf, "${local.on ? 1 : 0}", {"mode": "b"}) == 0
    assert value(tf, "${var.go && local.on ? local.items : {}}", {"go": True, "mode": "a"}) == {
        "k": "v"
    }
    assert value(tf, "${var.go && local.on ? local.items : {}}", {"go": False, "mode": "a"}) == {}
    assert value(tf, '${var.p == "" ? null : var.p}', {"p": ""}) is None
    assert value(tf, '${var.p == "" ? null : var.p}', {"p": "x/"}) == "x/"
    assert value(tf, "${!var.go || var.go}", {"go": False}) is True
    assert value(tf, '${coalesce(var.a, var.b, "c")}', {"a": "", "b": "b"}) == "b"
    assert value(tf, '${coalesce(var.a, var.b, "c")}', {"a": "", "b": ""}) == "c"
    assert value(tf, '${coalesce(var.a, var.b, "c")}', {"a": "a", "b": "b"}) == "a"
    assert value(tf, '${startswith(var.a, "sq") ? 1 : 2}', {"a": "sqlite:"}) == 1
    assert value(tf, '${startswith(var.a, "sq") ? 1 : 2}', {"a": "redis:"}) == 2
    for unreadable in ("${length(var.x) > 0 ? 1 : 0}", "${var.a ? 1 : var.b ? 2 : 3}", "1"):
        with pytest.raises((AssertionError, KeyError)):
            value(tf, unreadable, {"x": [], "a": True, "b": True})


def public_grant(tf: dict[str, Any]) -> dict[str, Any]:
    public = {
        address: body
        for address, body in resources(tf).items()
        if body.get("member") in {"allUsers", "allAuthenticatedUsers"}
    }
    _, grant = only(public)
    return grant


def satisfies(version: str, constraint: str) -> bool:
    """Terraform version constraint semantics for =, !=, >, >=, <, <= and ~>."""

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    wanted = parse(version)
    for clause in constraint.split(","):
        match = re.fullmatch(r"\s*(~>|>=|<=|!=|=|>|<)?\s*([\d.]+)\s*", clause)
        assert match, clause
        operator, bound = match[1] or "=", parse(match[2])
        padded = wanted + (0,) * (len(bound) - len(wanted))
        ok = {
            "=": padded[: len(bound)] == bound,
            "!=": padded[: len(bound)] != bound,
            ">": padded > bound,
            ">=": padded >= bound,
            "<": padded < bound,
            "<=": padded <= bound,
            "~>": padded >= bound and padded[: len(bound) - 1] == bound[:-1],
        }[operator]
        if not ok:
            return False
    return True


def test_terraform_and_the_google_provider_are_pinned(tf: dict[str, Any]) -> None:
    settings = single(tf["terraform"])
    required = settings["required_version"]
    assert satisfies("1.5.0", required)
    assert not satisfies("1.4.7", required)
    google = single(settings["required_providers"])["google"]
    assert google["source"] == "hashicorp/google"
    constraint = google["version"]
    assert satisfies("7.12.0", constraint)
    # 6.x has no service-level `scaling { max_instance_count }`; 8.x may break what is used here.
    for outside in ("5.45.0", "6.50.0", "8.0.0", "9.1.0"):
        assert not satisfies(outside, constraint), outside


def test_the_lock_file_pins_a_provider_release_the_constraint_admits(tf: dict[str, Any]) -> None:
    locked = load_terraform_lock()
    assert set(locked) == {"registry.terraform.io/hashicorp/google"}
    google = locked["registry.terraform.io/hashicorp/google"]
    required = single(single(tf["terraform"])["required_providers"])["google"]
    assert satisfies(google["version"], required["version"]), (google, required)
    # `terraform init` records the constraint it resolved; a different one means a stale lock.
    assert google["constraints"] == required["version"]
    hashes = google["hashes"]
    assert any(re.fullmatch(r"h1:[A-Za-z0-9+/]{43}=", value) for value in hashes)
    zip_hashes = [value for value in hashes if value.startswith("zh:")]
    assert len(zip_hashes) >= 10, "one zh: hash per platform package of the release"
    assert all(re.fullmatch(r"zh:[0-9a-f]{64}", value) for value in zip_hashes)
    assert all(re.fullmatch(r"(h1|zh):\S+", value) for value in hashes)


def test_version_constraint_reader_follows_terraform() -> None:
    assert satisfies("6.12.0", "~> 6.0")
    assert not satisfies("7.0.0", "~> 6.0")
    assert satisfies("7.3.1", ">= 6.0, < 8.0")
    assert not satisfies("8.0.0", ">= 6.0, < 8.0")


def test_one_trigger_per_storage_event_type(tf: dict[str, Any]) -> None:
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    reference = re.fullmatch(
        r"\$\{var\.create_triggers && local\.eventarc \? local\.(\w+) : \{\}\}",
        trigger["for_each"],
    )
    assert reference, "once created, the triggers iterate over a local map of event types"
    event_types = locals_(tf)[reference[1]]
    assert isinstance(event_types, dict)
    assert set(event_types.values()) == STORAGE_EVENT_TYPES
    assert len(event_types) == 4
    for key in event_types:
        # The key becomes part of the trigger ID: lowercase letters, digits, hyphens.
        assert re.fullmatch(r"[a-z][a-z0-9-]*", key), key
    assert "${each.key}" in trigger["name"]


def test_each_trigger_matches_its_type_and_the_bucket(tf: dict[str, Any]) -> None:
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    criteria = {entry["attribute"]: entry["value"] for entry in trigger["matching_criteria"]}
    assert criteria == {"type": "${each.value}", "bucket": "${var.bucket}"}


def test_triggers_live_in_the_bucket_location(tf: dict[str, Any]) -> None:
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    buckets = {
        address: body
        for address, body in resources(tf, "data").items()
        if address.startswith("google_storage_bucket.")
    }
    address, body = only(buckets)
    assert body["name"] == "${var.bucket}"
    assert trigger["location"] == "${lower(data." + address + ".location)}"


def test_triggers_deliver_to_the_service_root(tf: dict[str, Any]) -> None:
    service_address, _ = service(tf)
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    run = single(single(trigger["destination"])["cloud_run_service"])
    assert run["service"] == "${" + service_address + ".name}"
    assert run["region"] == "${" + service_address + ".location}"
    assert run["path"] == "/"


def test_triggers_deliver_as_the_trigger_service_account(tf: dict[str, Any]) -> None:
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    assert trigger["service_account"] == account_email(tf, "trigger")


def test_trigger_account_may_invoke_the_service(tf: dict[str, Any]) -> None:
    service_address, _ = service(tf)
    invokers = grants(tf, "google_cloud_run_v2_service_iam_member", "roles/run.invoker")
    trigger_member = "serviceAccount:" + account_email(tf, "trigger")
    private = [body for body in invokers.values() if body["member"] == trigger_member]
    assert len(private) == 1
    assert private[0]["name"] == "${" + service_address + ".name}"
    assert private[0]["location"] == "${" + service_address + ".location}"


def test_trigger_account_receives_events(tf: dict[str, Any]) -> None:
    receivers = grants(tf, "google_project_iam_member", "roles/eventarc.eventReceiver")
    _, grant = only(receivers)
    assert grant["member"] == "serviceAccount:" + account_email(tf, "trigger")
    for delivery, expected in (("eventarc", 1), ("pubsub", 0)):
        assert value(tf, grant["count"], {"delivery": delivery}) == expected


def test_storage_service_agent_may_publish_events(tf: dict[str, Any]) -> None:
    agents = {
        address
        for address in resources(tf, "data")
        if address.startswith("google_storage_project_service_account.")
    }
    assert len(agents) == 1
    _, grant = only(grants(tf, "google_project_iam_member", "roles/pubsub.publisher"))
    assert grant["member"] == "serviceAccount:${data." + next(iter(agents)) + ".email_address}"
    # Project-wide only for Eventarc's own topics; the Pub/Sub path grants on its topic alone.
    for delivery, expected in (("eventarc", 1), ("pubsub", 0)):
        assert value(tf, grant["count"], {"delivery": delivery}) == expected


def test_triggers_wait_for_the_grants_they_need(tf: dict[str, Any]) -> None:
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    depends_on = set(trigger["depends_on"])
    needed = {
        *grants(tf, "google_project_iam_member", "roles/pubsub.publisher"),
        *grants(tf, "google_project_iam_member", "roles/eventarc.eventReceiver"),
    }
    trigger_member = "serviceAccount:" + account_email(tf, "trigger")
    needed |= {
        address
        for address, body in grants(
            tf, "google_cloud_run_v2_service_iam_member", "roles/run.invoker"
        ).items()
        if body["member"] == trigger_member
    }
    assert {"${" + address + "}" for address in needed} <= depends_on


def test_sendgrid_key_comes_from_secret_manager(tf: dict[str, Any]) -> None:
    key = env(tf)["SENDGRID_API_KEY"]
    assert "value" not in key, "the key must never sit in the configuration"
    reference = single(single(key["value_source"])["secret_key_ref"])
    assert reference["secret"] == "${var.sendgrid_secret}"
    assert reference["version"] == "${var.sendgrid_secret_version}"
    readers = grants(
        tf, "google_secret_manager_secret_iam_member", "roles/secretmanager.secretAccessor"
    )
    address, grant = only(
        {a: g for a, g in readers.items() if g["secret_id"] == "${var.sendgrid_secret}"}
    )
    assert "count" not in grant
    assert grant["member"] == "serviceAccount:" + account_email(tf, "run")
    _, body = service(tf)
    assert "${" + address + "}" in body["depends_on"], "the revision starts only once it can read"


def test_events_are_authenticated_as_the_trigger_account(tf: dict[str, Any]) -> None:
    settings = env(tf)
    assert settings["EVENT_INVOKERS"]["value"] == account_email(tf, "trigger")
    assert settings["NOTIFIER"]["value"] == "sendgrid"
    assert settings["NOTIFY_TO"]["value"] == '${join(",", var.notify_to)}'
    assert settings["NOTIFY_FROM"]["value"] == "${var.notify_from}"


def test_service_runs_as_its_own_account_with_concurrency_80(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    template = single(body["template"])
    assert template["service_account"] == account_email(tf, "run")
    assert template["service_account"] != account_email(tf, "trigger")
    assert template["max_instance_request_concurrency"] == 80
    assert container(tf)["image"] == "${var.image}"


def test_the_instance_cap_is_max_instances_at_both_levels(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    scaling = single(single(body["template"])["scaling"])
    assert scaling["max_instance_count"] == "${local.max_instance_count}"
    # Service level too: a revision's own cap may briefly be exceeded, the service's may not.
    assert single(body["scaling"])["max_instance_count"] == "${local.max_instance_count}"
    assert blocks(tf, "variable")["max_instances"]["default"] == 10


def test_deletion_protection_is_a_variable(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    assert body["deletion_protection"] == "${var.deletion_protection}"
    assert blocks(tf, "variable")["deletion_protection"]["type"] == "bool"


def test_anyone_may_invoke_only_when_public_datetime(tf: dict[str, Any]) -> None:
    grant = public_grant(tf)
    assert grant["role"] == "roles/run.invoker"
    assert grant["count"] == "${var.public_datetime ? 1 : 0}"
    assert blocks(tf, "variable")["public_datetime"]["type"] == "bool"


def test_image_deployed_by_cloud_build_is_not_rolled_back(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    ignored = single(body["lifecycle"])["ignore_changes"]
    assert "${template[0].containers[0].image}" in ignored


def test_what_gcloud_run_deploy_writes_does_not_roll_a_new_revision(tf: dict[str, Any]) -> None:
    # `gcloud run deploy` stamps the client fields and writes template annotations and labels
    # (client.knative.dev/user-image): each would show as drift and make a revision per apply.
    _, body = service(tf)
    ignored = set(single(body["lifecycle"])["ignore_changes"])
    ignored = {entry.removeprefix("${").removesuffix("}") for entry in ignored}
    assert {"template[0].annotations", "template[0].labels", "client", "client_version"} <= (
        ignored
    )
    template = single(body["template"])
    assert "annotations" not in template, "ignored: Terraform could never change them"
    assert "labels" not in template, "ignored: Terraform could never change them"


def test_event_auth_pairs_with_who_may_invoke(tf: dict[str, Any]) -> None:
    # Public: Cloud Run passes the trigger's signed token through, the service verifies it (oidc).
    # Private: Cloud Run's IAM verifies it and removes the signature, the service must run iam.
    auth_variable, _, _ = conditional(env(tf)["EVENT_AUTH"]["value"])
    grant_variable, _, _ = conditional(public_grant(tf)["count"])
    assert auth_variable == grant_variable == "public_datetime"
    for public, expected in ((True, "oidc"), (False, "iam")):
        variables = {"public_datetime": public}
        assert evaluate(public_grant(tf)["count"], variables) == (1 if public else 0)
        assert evaluate(env(tf)["EVENT_AUTH"]["value"], variables) == expected


def test_event_audience_is_the_services_own_url(tf: dict[str, Any]) -> None:
    # Cloud Run's deterministic URL, https://SERVICE-PROJECT_NUMBER.REGION.run.app, of this
    # service: its name and region, and the number of the project it is created in.
    _, body = service(tf)
    assert body["name"] == "${var.service}"
    assert body["location"] == "${var.region}"
    assert env(tf)["EVENT_AUDIENCE"]["value"] == "${local.event_audience}"
    projects = {
        address: data
        for address, data in resources(tf, "data").items()
        if address.startswith("google_project.")
    }
    address, project = only(projects)
    assert project["project_id"] == "${var.project}"
    assert locals_(tf)["event_audience"] == (
        "https://${var.service}-${data." + address + ".number}.${var.region}.run.app"
    )


def test_cpu_is_billed_per_request_like_gcloud_deploys(tf: dict[str, Any]) -> None:
    resources_ = single(container(tf)["resources"])
    # With `resources` set, cpu_idle defaults to false: CPU always allocated, billed per instance.
    assert resources_["cpu_idle"] is True
    assert resources_["startup_cpu_boost"] is True


def test_with_cpu_only_during_requests_the_service_keeps_no_timer(tf: dict[str, Any]) -> None:
    """A flush of the service's own timer, frozen between requests, would wake with its claims
    lost: Cloud Scheduler's POST /digests/flush keeps time instead, retried within its minute."""
    assert single(container(tf)["resources"])["cpu_idle"] is True
    assert env(tf)["DIGEST_FLUSH_SECONDS"]["value"] == "0"
    job = only(of_type(tf, "google_cloud_scheduler_job"))[1]
    assert job["attempt_deadline"] == "30s"
    assert single(job["retry_config"])["retry_count"] >= 1


def test_no_trigger_exists_before_the_real_image_is_deployed(tf: dict[str, Any]) -> None:
    # The first revision runs a placeholder that answers 200 to any CloudEvent: a trigger in front
    # of it would acknowledge events without emailing them.
    variables = blocks(tf, "variable")
    placeholder = variables["image"].get("default")
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    if placeholder is not None:
        for delivery in DELIVERIES:
            before_the_build = {"create_triggers": False, "delivery": delivery}
            assert value(tf, trigger["for_each"], before_the_build) == {}
        assert variables["create_triggers"]["type"] == "bool"
        assert variables["create_triggers"]["default"] is False


PINNED_VERSIONS = ("1", "3", "27")
NOT_PINNED_VERSIONS = ("latest", "0", "01", "3 ", "1.0", "projects/p/secrets/s/versions/3")


def test_sendgrid_key_version_is_a_pinned_number(tf: dict[str, Any]) -> None:
    # `latest` resolves per instance start: after a rotation, warm instances keep the old key.
    variable = blocks(tf, "variable")["sendgrid_secret_version"]
    assert "default" not in variable, "a pinned version is the operator's choice, not ours"
    passes = version_rule(tf, "sendgrid_secret_version")
    for accepted in PINNED_VERSIONS:
        assert passes(accepted), accepted
    for refused in ("", *NOT_PINNED_VERSIONS):
        assert not passes(refused), refused


# --------------------------------------------------------------------------------------------
# The routing rules file (NOTIFY_RULES) from Secret Manager, mounted as a file
# --------------------------------------------------------------------------------------------

RULES_WHEN_SET = '${var.rules_secret == "" ? [] : [var.rules_secret]}'


def rules_volume(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    _, body = service(tf)
    found = dynamic(single(body["template"]), "volumes")
    assert len(found) == 1, found
    return found[0]


def rules_mount(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = dynamic(container(tf), "volume_mounts")
    assert len(found) == 1, found
    return found[0]


def notify_rules(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [entry for entry in dynamic(container(tf), "env") if entry[1]["name"] == "NOTIFY_RULES"]
    assert len(found) == 1, found
    return found[0]


def test_rules_volume_mount_and_notify_rules_exist_only_with_a_rules_secret(
    tf: dict[str, Any],
) -> None:
    # The three come and go together: a mount without NOTIFY_RULES would be ignored, NOTIFY_RULES
    # without the mount would stop every instance at start-up (no such file).
    conditions = {rules_volume(tf)[0], rules_mount(tf)[0], notify_rules(tf)[0]}
    assert conditions == {"${local.rules}"}
    assert locals_(tf)["rules"] == RULES_WHEN_SET
    assert "NOTIFY_RULES" not in env(tf), "never set unconditionally"
    assert "volume_mounts" not in container(tf), "never mounted unconditionally"
    variables = blocks(tf, "variable")
    assert variables["rules_secret"]["default"] == ""  # no rules file: today's behaviour
    assert variables["rules_secret_version"]["default"] == ""


def test_notify_rules_names_the_file_the_pinned_secret_version_is_mounted_as(
    tf: dict[str, Any],
) -> None:
    _, volume = rules_volume(tf)
    _, mount = rules_mount(tf)
    _, variable = notify_rules(tf)
    secret = single(volume["secret"])
    assert secret["secret"] == "${var.rules_secret}"
    item = single(secret["items"])
    assert item["version"] == "${var.rules_secret_version}"
    assert mount["name"] == volume["name"]
    mounted_file = with_locals(tf, mount["mount_path"]) + "/" + with_locals(tf, item["path"])
    assert with_locals(tf, variable["value"]) == mounted_file == "/etc/gcs-notifier/rules.yaml"


def test_rules_version_is_a_pinned_number_given_with_the_secret(tf: dict[str, Any]) -> None:
    # The service reads the file once at start-up: with `latest`, instances started after an
    # upload would route by the new file while warm ones kept the old, and a bad upload would stop
    # every new instance of the serving revision. Pinned, a bad file stops only a new revision.
    passes = version_rule(tf, "rules_secret_version")
    assert passes(""), "empty: no rules file"
    for accepted in PINNED_VERSIONS:
        assert passes(accepted), accepted
    for refused in NOT_PINNED_VERSIONS:
        assert not passes(refused), refused
    _, body = service(tf)
    (pairing,) = [
        check
        for check in single(body["lifecycle"])["precondition"]
        if "rules_secret_version" in check["condition"]
    ]
    assert pairing["condition"] == '${(var.rules_secret == "") == (var.rules_secret_version == "")}'
    assert "rules_secret_version" in pairing["error_message"]


def test_rules_secret_is_a_secret_id(tf: dict[str, Any]) -> None:
    passes = version_rule(tf, "rules_secret")
    for accepted in ("", "notify-rules", "rules_2"):
        assert passes(accepted), accepted
    for refused in ("notify-rules:2", "projects/p/secrets/notify-rules", "a,b", "a b"):
        assert not passes(refused), refused


def test_runtime_account_reads_the_rules_secret_only_when_there_is_one(
    tf: dict[str, Any],
) -> None:
    readers = grants(
        tf, "google_secret_manager_secret_iam_member", "roles/secretmanager.secretAccessor"
    )
    address, grant = only(
        {a: g for a, g in readers.items() if g["secret_id"] == "${var.rules_secret}"}
    )
    assert grant["count"] == '${var.rules_secret == "" ? 0 : 1}'
    assert grant["member"] == "serviceAccount:" + account_email(tf, "run")
    _, body = service(tf)
    assert "${" + address + "}" in body["depends_on"], "the revision starts only once it can read"


def hides(ignored: str, path: str) -> bool:
    """Whether `ignore_changes = [ignored]` also hides changes to the attribute at `path`."""
    return path == ignored or path.startswith((ignored + ".", ignored + "["))


def test_a_new_rules_version_is_not_hidden_by_ignore_changes(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    ignored = [
        entry.removeprefix("${").removesuffix("}")
        for entry in single(body["lifecycle"])["ignore_changes"]
    ]
    assert hides("template[0].annotations", "template[0].annotations")
    assert hides("template[0]", "template[0].volumes")
    assert not hides("template[0].containers[0].image", "template[0].containers[0].env")
    managed = (
        "template[0].volumes",
        "template[0].containers[0].volume_mounts",
        "template[0].containers[0].env",
    )
    for path in managed:
        assert not any(hides(entry, path) for entry in ignored), path


def test_cloud_build_gets_only_this_service_and_the_runtime_account(tf: dict[str, Any]) -> None:
    builder = "serviceAccount:${var.cloud_build_service_account}"
    for type_name in ("google_project_iam_member", "google_project_iam_binding"):
        for address, grant in of_type(tf, type_name).items():
            assert builder not in str(grant.get("member", grant.get("members"))), address
    (acts_as,) = [
        grant
        for grant in of_type(tf, "google_service_account_iam_member").values()
        if grant["member"] == builder
    ]
    assert acts_as["role"] == "roles/iam.serviceAccountUser"
    assert acts_as["service_account_id"] == "${google_service_account.runtime.name}"
    (deploys,) = [
        grant
        for grant in of_type(tf, "google_cloud_run_v2_service_iam_member").values()
        if grant["member"] == builder
    ]
    service_address, _ = service(tf)
    assert deploys["name"] == "${" + service_address + ".name}"
    # run.admin, not run.developer: the deploy sets the invoker policy (--allow-unauthenticated).
    assert deploys["role"] == "roles/run.admin"
    for grant in (acts_as, deploys):
        assert grant["count"] == '${var.cloud_build_service_account == "" ? 0 : 1}'


def test_each_triggers_subscription_alerts_long_before_eventarc_drops_events(
    tf: dict[str, Any],
) -> None:
    trigger_address, _ = only(of_type(tf, "google_eventarc_trigger"))
    _, policy = only(
        {a: p for a, p in of_type(tf, "google_monitoring_alert_policy").items() if "for_each" in p}
    )
    assert policy["for_each"] == "${" + trigger_address + "}"
    condition = single(single(policy["conditions"])["condition_threshold"])
    metric = "pubsub.googleapis.com/subscription/oldest_unacked_message_age"
    assert f'metric.type = "{metric}"' in condition["filter"]
    assert 'resource.type = "pubsub_subscription"' in condition["filter"]
    assert (
        'resource.labels.subscription_id = "${local.subscription_ids[each.key]}"'
        in (condition["filter"])
    )
    subscription_ids = locals_(tf)["subscription_ids"]
    assert f"in {trigger_address} :" in subscription_ids
    assert ".transport[0].pubsub[0].subscription" in subscription_ids
    assert condition["comparison"] == "COMPARISON_GT"
    assert condition["threshold_value"] == "${var.alert_after_seconds}"
    seconds = blocks(tf, "variable")["alert_after_seconds"]
    assert seconds["default"] <= 6 * 3600, "most of Eventarc's 24 hours must remain to act"
    assert policy["notification_channels"] == "${var.alert_notification_channels}"


# --------------------------------------------------------------------------------------------
# Digests: Cloud Scheduler calls POST /digests/flush (CPU is throttled between requests)
# --------------------------------------------------------------------------------------------


def flush_job(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return only(of_type(tf, "google_cloud_scheduler_job"))


def flush_target(tf: dict[str, Any]) -> dict[str, Any]:
    _, job = flush_job(tf)
    target: dict[str, Any] = single(job["http_target"])
    return target


def seconds(duration: str) -> float:
    """A Cloud Scheduler duration ("30s", "3.5s") in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d{1,9})?)s", duration)
    assert match, duration
    return float(match[1])


def test_a_scheduler_job_flushes_digests_every_minute_by_default(tf: dict[str, Any]) -> None:
    variable = blocks(tf, "variable")["digest_schedule"]
    assert variable["type"] == "string"
    assert variable["default"] == "* * * * *"
    _, job = flush_job(tf)
    assert job["schedule"] == "${var.digest_schedule}"
    assert job["time_zone"] == "Etc/UTC"
    service_address, _ = service(tf)
    assert job["region"] == "${" + service_address + ".location}"
    assert job.get("paused") in (None, False)


def test_no_scheduler_job_when_digest_schedule_is_empty(tf: dict[str, Any]) -> None:
    _, job = flush_job(tf)
    assert job["count"] == '${var.digest_schedule == "" ? 0 : 1}'
    # The output must not index a job that does not exist.
    address, _ = flush_job(tf)
    assert blocks(tf, "output")["digest_flush_job"]["value"] == f"${{one({address}[*].name)}}"


def test_digest_schedule_is_five_cron_fields_or_empty(tf: dict[str, Any]) -> None:
    passes = version_rule(tf, "digest_schedule")
    for accepted in ("", "* * * * *", "*/5 * * * *", "0 9 * * 1-5", "0,30 * * * *"):
        assert passes(accepted), accepted
    for refused in ("* * * *", "* * * * * *", " * * * * *", "*  * * * *", "every 1 mins"):
        assert not passes(refused), refused


def test_the_job_posts_to_the_services_flush_route(tf: dict[str, Any]) -> None:
    service_address, _ = service(tf)
    target = flush_target(tf)
    assert target["http_method"] == "POST"
    assert target["uri"] == "${" + service_address + ".uri}/digests/flush"


def test_the_job_calls_as_the_trigger_account_for_the_events_audience(
    tf: dict[str, Any],
) -> None:
    # POST /digests/flush is protected exactly like POST /: the same invoker (EVENT_INVOKERS),
    # the same audience (EVENT_AUDIENCE), and on a private service the same run.invoker grant.
    target = flush_target(tf)
    assert "oauth_token" not in target, "an OAuth token is for Google APIs, not Cloud Run"
    token = single(target["oidc_token"])
    assert token["service_account_email"] == env(tf)["EVENT_INVOKERS"]["value"]
    assert token["service_account_email"] == account_email(tf, "trigger")
    assert token["audience"] == env(tf)["EVENT_AUDIENCE"]["value"] == "${local.event_audience}"
    trigger_member = "serviceAccount:" + account_email(tf, "trigger")
    (invoker,) = [
        address
        for address, grant in grants(
            tf, "google_cloud_run_v2_service_iam_member", "roles/run.invoker"
        ).items()
        if grant["member"] == trigger_member
    ]
    _, job = flush_job(tf)
    assert "${" + invoker + "}" in job["depends_on"], "the first call must not meet a 403"


def test_the_job_gives_up_and_retries_before_the_service_times_out(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    request_timeout = seconds(single(body["template"])["timeout"])
    _, job = flush_job(tf)
    deadline = seconds(job["attempt_deadline"])
    assert 15 <= deadline <= request_timeout / 2, "HTTP targets allow 15 s to 30 min"
    retry = single(job["retry_config"])
    assert 1 <= retry["retry_count"] <= 5, "Cloud Scheduler allows 0 to 5"
    assert seconds(retry["min_backoff_duration"]) <= seconds(retry["max_backoff_duration"])
    assert seconds(retry["max_backoff_duration"]) < 60, "retries land before the next run"


def test_seconds_reads_cloud_scheduler_durations() -> None:
    assert seconds("30s") == 30
    assert seconds("3.5s") == 3.5
    for bad in ("30", "1m", "s", "-5s"):
        with pytest.raises(AssertionError):
            seconds(bad)


def readme_shell_blocks() -> list[list[list[str]]]:
    """The README's ```sh blocks, each as its commands (backslash continuations joined, comments
    dropped) split into words the way the shell would."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S):
        lines = block.replace("\\\n", " ").splitlines()
        found.append([words for line in lines if (words := shlex.split(line, comments=True))])
    return found


def flags(words: list[str]) -> dict[str, str]:
    found = {}
    for word in words:
        if word.startswith("--"):
            name, equals, value = word.removeprefix("--").partition("=")
            assert equals, word
            found[name] = value
    return found


def test_the_readmes_gcloud_job_is_the_terraform_job(tf: dict[str, Any]) -> None:
    # The gcloud-only path (README, "Digests on Cloud Run") must make the job Terraform makes.
    create = ["gcloud", "scheduler", "jobs", "create", "http"]
    (block,) = [b for b in readme_shell_blocks() if any(c[:5] == create for c in b)]
    (command,) = [c for c in block if c[:5] == create]
    given = flags(command)
    _, job = flush_job(tf)
    service_name = blocks(tf, "variable")["service"]["default"]
    assert command[5] == job["name"].replace("${var.service}", service_name)
    assert given["location"] == "$REGION"
    assert given["schedule"] == blocks(tf, "variable")["digest_schedule"]["default"]
    assert given["time-zone"] == job["time_zone"]
    assert given["http-method"] == flush_target(tf)["http_method"]
    assert given["oidc-service-account-email"] == "$TRIGGER_SA"
    # The audience is the deterministic URL (EVENT_AUDIENCE); the job posts to its flush route.
    audience = given["oidc-token-audience"]
    assert given["uri"] == audience + "/digests/flush"
    assignments = dict(c[0].split("=", 1) for c in block if re.fullmatch(r"[A-Z_]+=\S*", c[0]))
    assert audience == "$URL"
    assert assignments["URL"] == "https://" + service_name + "-$PROJECT_NUMBER.$REGION.run.app"
    assert given["attempt-deadline"] == job["attempt_deadline"]
    retry = single(job["retry_config"])
    assert int(given["max-retry-attempts"]) == retry["retry_count"]
    assert given["min-backoff"] == retry["min_backoff_duration"]
    assert given["max-backoff"] == retry["max_backoff_duration"]
    assert int(given["max-doublings"]) == retry["max_doublings"]


def test_the_readme_enables_every_api_terraform_enables(tf: dict[str, Any]) -> None:
    _, api = only(of_type(tf, "google_project_service"))
    listed = locals_(tf)[api["for_each"].removeprefix("${local.").removesuffix("}")]
    enabled = set(re.findall(r'"([a-z]+\.googleapis\.com)"', listed))
    enable = ["gcloud", "services", "enable"]
    commands = [c for b in readme_shell_blocks() for c in b if c[:3] == enable]
    assert commands, "README, Prerequisites: gcloud services enable ..."
    assert enabled <= set(commands[0][3:])


def test_required_apis_are_enabled(tf: dict[str, Any]) -> None:
    _, api = only(of_type(tf, "google_project_service"))
    reference = re.fullmatch(r"\$\{local\.(\w+)\}", api["for_each"])
    assert reference
    listed = locals_(tf)[reference[1]]
    match = re.fullmatch(r"\$\{toset\(\[(.*)\]\)\}", listed, re.S)
    assert match, listed
    enabled = set(re.findall(r'"([a-z]+\.googleapis\.com)"', match[1]))
    assert enabled >= REQUIRED_APIS
    assert api["service"] == "${each.key}"
    assert api["disable_on_destroy"] is False


def test_inputs_are_variables(tf: dict[str, Any]) -> None:
    declared = blocks(tf, "variable")
    expected = {"project", "region", "bucket", "image", "notify_to", "notify_from"}
    expected |= {"sendgrid_secret", "sendgrid_secret_version", "public_datetime"}
    expected |= {"deletion_protection", "create_triggers", "cloud_build_service_account"}
    expected |= {"alert_after_seconds", "alert_notification_channels"}
    expected |= {"rules_secret", "rules_secret_version"}
    expected |= {"digest_schedule", "delivery", "object_name_prefix"}
    expected |= {"firestore_database", "store_prefix", "idempotency_store", "redis_url"}
    expected |= {"max_instances"}
    assert expected <= set(declared)
    for name, variable in declared.items():
        assert variable.get("description"), f"variable {name} has no description"
        assert "type" in variable, f"variable {name} has no type"


def test_every_reference_is_declared(tf: dict[str, Any]) -> None:
    text = "\n".join(strings(tf))
    variables = set(blocks(tf, "variable"))
    assert set(re.findall(r"\bvar\.(\w+)", text)) <= variables
    assert set(re.findall(r"\blocal\.(\w+)", text)) <= set(locals_(tf))
    data_sources = set(resources(tf, "data"))
    assert {f"{t}.{n}" for t, n in re.findall(r"\bdata\.(google_\w+)\.(\w+)", text)} <= (
        data_sources
    )
    managed = set(resources(tf))
    referenced = {f"{t}.{n}" for t, n in re.findall(r"(?<![.\w])(google_\w+)\.(\w+)", text)}
    assert referenced <= managed


def test_outputs_name_the_service_url_and_the_triggers(tf: dict[str, Any]) -> None:
    outputs = blocks(tf, "output")
    service_address, _ = service(tf)
    assert outputs["service_url"]["value"] == "${" + service_address + ".uri}"
    trigger_address, _ = only(of_type(tf, "google_eventarc_trigger"))
    assert trigger_address in outputs["trigger_names"]["value"]
    assert ".name" in outputs["trigger_names"]["value"]


def _undocumented(body: Any, schema: Schema, path: str) -> list[str]:
    problems = []
    for key, value in body.items():
        if key == "dynamic":  # dynamic "NAME" { for_each = ..., content { ... } }
            for entry in value:
                for name, dynamic in entry.items():
                    nested_schema = schema.get(name)
                    if nested_schema is None:
                        problems.append(f"{path}.dynamic.{name}")
                        continue
                    for content in dynamic["content"]:
                        problems += _undocumented(content, nested_schema, f"{path}.{name}")
            continue
        if key not in schema:
            problems.append(f"{path}.{key}")
            continue
        nested = schema[key]
        if nested is not None and isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    problems += _undocumented(item, nested, f"{path}.{key}")
    return problems


def test_every_argument_is_a_documented_provider_argument(tf: dict[str, Any]) -> None:
    problems = []
    for kind, prefix in (("resource", ""), ("data", "data.")):
        for address, body in resources(tf, kind).items():
            type_name = prefix + address.split(".")[0]
            assert type_name in DOCUMENTED, f"{type_name}: add its documented arguments"
            schema: Schema = {**DOCUMENTED[type_name], **dict.fromkeys(META_ARGUMENTS)}
            problems += _undocumented(body, schema, address)
    assert problems == []


# --------------------------------------------------------------------------------------------
# delivery = "pubsub": the bucket's notification config, a push subscription, a dead-letter topic
# --------------------------------------------------------------------------------------------

# The JSON API's notification event types, as Eventarc names the same four changes.
NOTIFICATION_EVENT_TYPES = {
    "OBJECT_FINALIZE": "google.cloud.storage.object.v1.finalized",
    "OBJECT_DELETE": "google.cloud.storage.object.v1.deleted",
    "OBJECT_ARCHIVE": "google.cloud.storage.object.v1.archived",
    "OBJECT_METADATA_UPDATE": "google.cloud.storage.object.v1.metadataUpdated",
}

# How long the service keeps a change's done mark (app/idempotency, README "Delivery
# guarantees"): a redelivery later than this could email twice.
DONE_MARK_SECONDS = 25 * 3600


def named(tf: dict[str, Any], type_name: str, words: str) -> tuple[str, dict[str, Any]]:
    """The one resource of `type_name` whose name contains `words`."""
    return only({a: b for a, b in of_type(tf, type_name).items() if words in a.split(".")[1]})


def reference(address: str, attribute: str) -> str:
    """`${ADDRESS[0].ATTRIBUTE}`: an attribute of a resource that has a count."""
    return "${" + address + "[0]." + attribute + "}"


def notification(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return only(of_type(tf, "google_storage_notification"))


def push_subscription(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = {
        address: body
        for address, body in of_type(tf, "google_pubsub_subscription").items()
        if "push_config" in body
    }
    return only(found)


def dead_letter_subscription(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = {
        address: body
        for address, body in of_type(tf, "google_pubsub_subscription").items()
        if "push_config" not in body
    }
    return only(found)


def topic_grant(tf: dict[str, Any], topic: str, role: str) -> tuple[str, dict[str, Any]]:
    found = {
        address: body
        for address, body in of_type(tf, "google_pubsub_topic_iam_member").items()
        if body["topic"] == reference(topic, "id") and body["role"] == role
    }
    return only(found)


def pubsub_agent(tf: dict[str, Any]) -> str:
    """The Pub/Sub service agent's member string, with the project number reference."""
    member = locals_(tf)["pubsub_service_agent"]
    assert isinstance(member, str)
    return member


def gcloud_seconds(duration: str) -> int:
    """A gcloud duration flag (10s, 5m, 2h, 7d) or a Pub/Sub duration (86400s) in seconds."""
    match = re.fullmatch(r"(\d+)([smhd])", duration)
    assert match, duration
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def test_gcloud_seconds_reads_durations() -> None:
    assert gcloud_seconds("1d") == gcloud_seconds("86400s") == 86400
    assert gcloud_seconds("10m") == 600
    for bad in ("1.5d", "d", "7", "1w"):
        with pytest.raises(AssertionError):
            gcloud_seconds(bad)


def test_delivery_is_eventarc_by_default_or_pubsub(tf: dict[str, Any]) -> None:
    variable = blocks(tf, "variable")["delivery"]
    assert variable["type"] == "string"
    assert variable["default"] == "eventarc", "today's path stays the default"
    condition = single(variable["validation"])["condition"]
    match = re.fullmatch(r"\$\{contains\(\[(.*)\], var\.delivery\)\}", condition)
    assert match, condition
    allowed = set(re.findall(r'"(\w+)"', match[1]))
    assert allowed == set(DELIVERIES)


def test_each_delivery_creates_only_its_own_path(tf: dict[str, Any]) -> None:
    # (resource, exists with eventarc, exists with pubsub), once create_triggers is true; before
    # it, neither path connects the bucket (the placeholder image would acknowledge everything).
    eventarc_only = [
        named(tf, "google_project_iam_member", "receives_events"),
        named(tf, "google_project_iam_member", "gcs_publishes"),
    ]
    pubsub_topics = [*of_type(tf, "google_pubsub_topic").items()]
    pubsub_standing = [
        *pubsub_topics,
        dead_letter_subscription(tf),
        *of_type(tf, "google_pubsub_topic_iam_member").items(),
    ]
    pubsub_connecting = [
        notification(tf),
        push_subscription(tf),
        *of_type(tf, "google_pubsub_subscription_iam_member").items(),
        only(
            {a: p for a, p in of_type(tf, "google_monitoring_alert_policy").items() if "count" in p}
        ),
    ]
    assert len(pubsub_topics) == 2
    _, trigger = only(of_type(tf, "google_eventarc_trigger"))
    for delivery in DELIVERIES:
        for create_triggers in (False, True):
            variables = {"delivery": delivery, "create_triggers": create_triggers}
            triggers = value(tf, trigger["for_each"], variables)
            expected = 4 if create_triggers and delivery == "eventarc" else 0
            assert len(triggers) == expected, variables
            for address, body in eventarc_only:
                assert value(tf, body["count"], variables) == (delivery == "eventarc"), address
            for address, body in pubsub_standing:
                assert value(tf, body["count"], variables) == (delivery == "pubsub"), address
            for address, body in pubsub_connecting:
                wanted = create_triggers and delivery == "pubsub"
                assert value(tf, body["count"], variables) == wanted, (address, variables)


def test_moved_blocks_keep_the_eventarc_grants_state(tf: dict[str, Any]) -> None:
    # The two Eventarc-only grants gained a count: without `moved`, the next apply of an existing
    # Eventarc deployment would destroy and re-create them (a moment without the grant).
    moves = {entry["from"]: entry["to"] for entry in tf.get("moved", [])}
    for address, body in (
        named(tf, "google_project_iam_member", "receives_events"),
        named(tf, "google_project_iam_member", "gcs_publishes"),
    ):
        assert "count" in body
        assert moves["${" + address + "}"] == "${" + address + "[0]}"


def test_the_pubsub_agent_may_mint_the_trigger_accounts_tokens_on_both_paths(
    tf: dict[str, Any],
) -> None:
    # Pub/Sub and Eventarc docs: a Pub/Sub service agent created on or before 8 April 2021 needs
    # roles/iam.serviceAccountTokenCreator to sign authenticated pushes; both paths push.
    project_address, _ = only(
        {a: d for a, d in resources(tf, "data").items() if a.startswith("google_project.")}
    )
    assert pubsub_agent(tf) == (
        "serviceAccount:service-${data."
        + project_address
        + ".number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    )
    _, grant = only(
        grants(tf, "google_service_account_iam_member", "roles/iam.serviceAccountTokenCreator")
    )
    assert grant["member"] == "${local.pubsub_service_agent}"
    assert grant["service_account_id"] == "${google_service_account.trigger.name}"
    assert "count" not in grant
    address = "google_service_account_iam_member." + next(
        a.split(".")[1]
        for a, g in of_type(tf, "google_service_account_iam_member").items()
        if g is grant
    )
    _, subscription = push_subscription(tf)
    assert "${" + address + "}" in subscription["depends_on"]


def test_the_bucket_notifies_the_four_changes_as_json_api_v1(tf: dict[str, Any]) -> None:
    _, config = notification(tf)
    assert config["bucket"] == "${var.bucket}"
    assert config["payload_format"] == "JSON_API_V1", "the object resource, as Eventarc sends"
    types = config["event_types"]
    listed = locals_(tf)[types.removeprefix("${local.").removesuffix("}")]
    assert sorted(listed) == sorted(NOTIFICATION_EVENT_TYPES)
    assert len(listed) == 4
    # The same four changes the Eventarc path delivers.
    assert set(NOTIFICATION_EVENT_TYPES.values()) == STORAGE_EVENT_TYPES
    topic, _ = named(tf, "google_pubsub_topic", "notifications")
    assert config["topic"] == reference(topic, "id")


def test_object_name_prefix_filters_at_the_source_and_needs_pubsub(tf: dict[str, Any]) -> None:
    variable = blocks(tf, "variable")["object_name_prefix"]
    assert variable["type"] == "string"
    assert variable["default"] == ""
    _, config = notification(tf)
    for prefix, sent in (("", None), ("photos/", "photos/")):
        assert value(tf, config["object_name_prefix"], {"object_name_prefix": prefix}) == sent
    _, body = service(tf)
    (check,) = [
        entry
        for entry in single(body["lifecycle"])["precondition"]
        if "object_name_prefix" in entry["condition"]
    ]
    for delivery, prefix, allowed in (
        ("eventarc", "", True),
        ("pubsub", "", True),
        ("pubsub", "photos/", True),
        ("eventarc", "photos/", False),
    ):
        variables = {"delivery": delivery, "object_name_prefix": prefix}
        assert value(tf, check["condition"], variables) is allowed, variables


def test_only_the_storage_agent_publishes_and_only_to_its_topic(tf: dict[str, Any]) -> None:
    topic, _ = named(tf, "google_pubsub_topic", "notifications")
    address, grant = topic_grant(tf, topic, "roles/pubsub.publisher")
    (agent,) = [a for a in resources(tf, "data") if a.startswith("google_storage_project_")]
    assert grant["member"] == "serviceAccount:${data." + agent + ".email_address}"
    # The provider's docs: the notification config waits for the grant (an IAM race otherwise).
    _, config = notification(tf)
    assert "${" + address + "}" in config["depends_on"]
    # And for the subscription: a change published before it exists would be lost.
    subscription, _ = push_subscription(tf)
    assert "${" + subscription + "}" in config["depends_on"]


def test_the_push_goes_to_the_service_root_as_the_trigger_account(tf: dict[str, Any]) -> None:
    service_address, _ = service(tf)
    _, subscription = push_subscription(tf)
    topic, _ = named(tf, "google_pubsub_topic", "notifications")
    assert subscription["topic"] == reference(topic, "id")
    push = single(subscription["push_config"])
    assert push["push_endpoint"] == "${" + service_address + ".uri}/"
    assert "no_wrapper" not in push, "the wrapped format carries messageId and attributes"
    token = single(push["oidc_token"])
    # The service accepts exactly this account (EVENT_INVOKERS) for exactly this audience.
    assert token["service_account_email"] == env(tf)["EVENT_INVOKERS"]["value"]
    assert token["service_account_email"] == account_email(tf, "trigger")
    assert token["audience"] == env(tf)["EVENT_AUDIENCE"]["value"] == "${local.event_audience}"
    # The account may invoke before the first push: on a private service, Cloud Run checks it.
    trigger_member = "serviceAccount:" + account_email(tf, "trigger")
    (invoker,) = [
        address
        for address, grant in grants(
            tf, "google_cloud_run_v2_service_iam_member", "roles/run.invoker"
        ).items()
        if grant["member"] == trigger_member
    ]
    assert "${" + invoker + "}" in subscription["depends_on"]


def test_pushes_wait_for_the_answer_and_back_off(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    request_timeout = seconds(single(body["template"])["timeout"])
    _, subscription = push_subscription(tf)
    # Pub/Sub's push deadline is the ack deadline (10 to 600 s): beyond the request timeout, so
    # a slow send is not pushed a second time while it still runs.
    assert request_timeout < subscription["ack_deadline_seconds"] <= 600
    retry = single(subscription["retry_policy"])
    minimum, maximum = seconds(retry["minimum_backoff"]), seconds(retry["maximum_backoff"])
    assert 0 < minimum <= maximum <= 600, "Pub/Sub allows 0 to 600 s"
    retention = gcloud_seconds(subscription["message_retention_duration"])
    assert 600 <= retention < DONE_MARK_SECONDS, "no redelivery after the done marks are gone"
    assert single(subscription["expiration_policy"])["ttl"] == "", "never expires"


def test_a_message_is_dead_lettered_after_ten_attempts_and_kept(tf: dict[str, Any]) -> None:
    _, subscription = push_subscription(tf)
    dead_topic, _ = named(tf, "google_pubsub_topic", "dead_letter")
    policy = single(subscription["dead_letter_policy"])
    assert policy["dead_letter_topic"] == reference(dead_topic, "id")
    assert policy["max_delivery_attempts"] == 10
    assert policy["dead_letter_topic"] != subscription["topic"]
    # A topic without a subscription drops what it receives: this one holds it, 7 days.
    _, holder = dead_letter_subscription(tf)
    assert holder["topic"] == reference(dead_topic, "id")
    assert gcloud_seconds(holder["message_retention_duration"]) == 7 * 86400
    assert single(holder["expiration_policy"])["ttl"] == ""


def test_the_pubsub_agent_may_forward_dead_letters(tf: dict[str, Any]) -> None:
    # Pub/Sub docs, "Dead-letter topics": publisher on the dead-letter topic and subscriber on
    # the source subscription, or Pub/Sub neither counts attempts nor forwards.
    dead_topic, _ = named(tf, "google_pubsub_topic", "dead_letter")
    address, publisher = topic_grant(tf, dead_topic, "roles/pubsub.publisher")
    assert publisher["member"] == "${local.pubsub_service_agent}"
    subscription_address, subscription = push_subscription(tf)
    _, subscriber = only(of_type(tf, "google_pubsub_subscription_iam_member"))
    assert subscriber["subscription"] == reference(subscription_address, "id")
    assert subscriber["role"] == "roles/pubsub.subscriber"
    assert subscriber["member"] == "${local.pubsub_service_agent}"
    assert "${" + address + "}" in subscription["depends_on"]


def test_dead_lettered_or_long_undelivered_notifications_alert(tf: dict[str, Any]) -> None:
    _, policy = only(
        {a: p for a, p in of_type(tf, "google_monitoring_alert_policy").items() if "count" in p}
    )
    conditions = [single(entry["condition_threshold"]) for entry in policy["conditions"]]
    assert policy["combiner"] == "OR"
    dead_address, _ = dead_letter_subscription(tf)
    push_address, _ = push_subscription(tf)
    by_metric = {
        re.search(r'metric\.type = "([^"]+)"', entry["filter"])[1]: entry  # type: ignore[index]
        for entry in conditions
    }
    dead = by_metric["pubsub.googleapis.com/subscription/num_undelivered_messages"]
    assert (
        f'resource.labels.subscription_id = "{reference(dead_address, "name")}"' in (dead["filter"])
    )
    assert dead["comparison"] == "COMPARISON_GT"
    assert dead["threshold_value"] == 0, "one dead letter is one change nobody was told about"
    late = by_metric["pubsub.googleapis.com/subscription/oldest_unacked_message_age"]
    assert (
        f'resource.labels.subscription_id = "{reference(push_address, "name")}"' in (late["filter"])
    )
    assert late["threshold_value"] == "${var.alert_after_seconds}"
    for entry in conditions:
        assert 'resource.type = "pubsub_subscription"' in entry["filter"]
    assert policy["notification_channels"] == "${var.alert_notification_channels}"


def test_outputs_name_the_topic_and_subscription_or_null(tf: dict[str, Any]) -> None:
    outputs = blocks(tf, "output")
    topic, _ = named(tf, "google_pubsub_topic", "notifications")
    push, _ = push_subscription(tf)
    dead, _ = dead_letter_subscription(tf)
    assert outputs["pubsub_topic"]["value"] == f"${{one({topic}[*].name)}}"
    assert outputs["pubsub_subscription"]["value"] == f"${{one({push}[*].name)}}"
    assert outputs["dead_letter_subscription"]["value"] == f"${{one({dead}[*].name)}}"


# The README's gcloud-only Pub/Sub path (2b) must make what Terraform makes.


def readme_commands(prefix: list[str]) -> list[list[str]]:
    return [c for b in readme_shell_blocks() for c in b if c[: len(prefix)] == prefix]


def readme_assignments(prefix: list[str]) -> dict[str, str]:
    """The shell variables assigned in the README block that runs the command `prefix`."""
    (block,) = [b for b in readme_shell_blocks() if any(c[: len(prefix)] == prefix for c in b)]
    found = {}
    for command in block:
        if re.fullmatch(r"[A-Z_]+=\S*", command[0]):
            name, _, assigned = command[0].partition("=")
            found[name] = assigned
    return found


def as_gcloud(tf: dict[str, Any], text: str) -> str:
    """A Terraform name as the README writes it: var.service's default, $-variables for the rest."""
    service_name = blocks(tf, "variable")["service"]["default"]
    return text.replace("${var.service}", service_name).replace("${var.bucket}", "$BUCKET")


def resource_name(tf: dict[str, Any], address: str) -> str:
    return as_gcloud(tf, resources(tf)[address]["name"])


def test_the_readmes_gcloud_pubsub_path_is_the_terraform_path(tf: dict[str, Any]) -> None:
    topic = resource_name(tf, named(tf, "google_pubsub_topic", "notifications")[0])
    dead_topic = resource_name(tf, named(tf, "google_pubsub_topic", "dead_letter")[0])
    push_address, push = push_subscription(tf)
    holder_address, holder = dead_letter_subscription(tf)
    created = {c[4] for c in readme_commands(["gcloud", "pubsub", "topics", "create"])}
    assert created == {topic, dead_topic}

    by_name = {c[4]: c for c in readme_commands(["gcloud", "pubsub", "subscriptions", "create"])}
    assert set(by_name) == {resource_name(tf, push_address), resource_name(tf, holder_address)}
    given = flags(by_name[resource_name(tf, push_address)])
    assert given["topic"] == topic
    # The README pushes to the deterministic URL, the audience: the same service and path.
    assert given["push-endpoint"] == given["push-auth-token-audience"] + "/"
    assert given["push-auth-token-audience"] == "$URL"
    service_name = blocks(tf, "variable")["service"]["default"]
    assert readme_assignments(["gcloud", "pubsub", "subscriptions", "create"])["URL"] == (
        "https://" + service_name + "-$PROJECT_NUMBER.$REGION.run.app"
    )
    assert given["push-auth-service-account"] == "$TRIGGER_SA"
    assert int(given["ack-deadline"]) == push["ack_deadline_seconds"]
    assert gcloud_seconds(given["message-retention-duration"]) == gcloud_seconds(
        push["message_retention_duration"]
    )
    assert given["expiration-period"] == "never"
    retry = single(push["retry_policy"])
    assert gcloud_seconds(given["min-retry-delay"]) == gcloud_seconds(retry["minimum_backoff"])
    assert gcloud_seconds(given["max-retry-delay"]) == gcloud_seconds(retry["maximum_backoff"])
    policy = single(push["dead_letter_policy"])
    assert given["dead-letter-topic"] == dead_topic
    assert int(given["max-delivery-attempts"]) == policy["max_delivery_attempts"]

    kept = flags(by_name[resource_name(tf, holder_address)])
    assert kept["topic"] == dead_topic
    assert gcloud_seconds(kept["message-retention-duration"]) == gcloud_seconds(
        holder["message_retention_duration"]
    )
    assert kept["expiration-period"] == "never"


def test_the_readmes_notification_config_is_the_terraform_one(tf: dict[str, Any]) -> None:
    (command,) = readme_commands(["gcloud", "storage", "buckets", "notifications", "create"])
    assert command[5] == "gs://$BUCKET"
    given = flags(command)
    _, config = notification(tf)
    topic = resource_name(tf, named(tf, "google_pubsub_topic", "notifications")[0])
    assert given["topic"] == topic
    # gcloud names the payload formats json and none.
    assert {"json": "JSON_API_V1", "none": "NONE"}[given["payload-format"]] == (
        config["payload_format"]
    )
    listed = locals_(tf)[config["event_types"].removeprefix("${local.").removesuffix("}")]
    assert given["event-types"].split(",") == listed
    assert "object-prefix" not in given, "no prefix by default, like object_name_prefix"


def test_the_readmes_pubsub_grants_are_the_terraform_grants(tf: dict[str, Any]) -> None:
    topic = resource_name(tf, named(tf, "google_pubsub_topic", "notifications")[0])
    dead_topic = resource_name(tf, named(tf, "google_pubsub_topic", "dead_letter")[0])
    push_address, _ = push_subscription(tf)
    assignments = readme_assignments(["gcloud", "pubsub", "topics", "add-iam-policy-binding"])
    # $PUBSUB_SA is the Pub/Sub service agent; $GCS_SA is read from `gcloud storage service-agent`.
    number = r"\$\{data\.[\w.]+\.number\}"
    agent = re.sub(number, "$PROJECT_NUMBER", pubsub_agent(tf).removeprefix("serviceAccount:"))
    assert assignments["PUBSUB_SA"] == agent
    storage_agent = ["GCS_SA=$(gcloud", "storage", "service-agent", "--project=$PROJECT)"]
    assert any(c == storage_agent for b in readme_shell_blocks() for c in b)

    def bindings(kind: str) -> set[tuple[str, str, str]]:
        found = set()
        for command in readme_commands(["gcloud", "pubsub", kind, "add-iam-policy-binding"]):
            given = flags(command)
            found.add((command[4], given["member"], given["role"]))
        return found

    assert bindings("topics") == {
        (topic, "serviceAccount:$GCS_SA", "roles/pubsub.publisher"),
        (dead_topic, "serviceAccount:$PUBSUB_SA", "roles/pubsub.publisher"),
    }
    assert bindings("subscriptions") == {
        (resource_name(tf, push_address), "serviceAccount:$PUBSUB_SA", "roles/pubsub.subscriber")
    }
    # The token creator grant of the Eventarc path (2b) serves the push subscription too.
    token_creator = [
        flags(c)
        for c in readme_commands(["gcloud", "iam", "service-accounts", "add-iam-policy-binding"])
        if c[4] == "$TRIGGER_SA"
    ]
    assert any(
        g["role"] == "roles/iam.serviceAccountTokenCreator"
        and g["member"] == "serviceAccount:" + agent
        for g in token_creator
    )


# --------------------------------------------------------------------------------------------
# State: the Firestore database, its TTL policies and index, the grant, IDEMPOTENCY_STORE
# --------------------------------------------------------------------------------------------

# The collection groups whose documents carry `expire_at`, as the design of the Firestore stores
# names them after the prefix (app/stores/firestore.py): a digest window's events in one group per
# shard, and under windows of the layout before shards in `digest-events`.
EVENT_SHARDS = [f"digest-events-{shard}" for shard in range(8)]
TTL_COLLECTIONS = {
    "claims",
    "digest-changes",
    "digest-windows",
    "digest-events",
    *EVENT_SHARDS,
    "digest-rates",
}

# The variables a plain `terraform apply` runs with, for the values these tests compute.
DEFAULT_STORE_VARIABLES = {"project": "my-project", "redis_url": "", "idempotency_store": ""}


def rendered(tf: dict[str, Any], text: str, variables: dict[str, Any]) -> str:
    """A string template of this file as Terraform fills it in: `${var.NAME}` from `variables`
    (else the variable's default), `${TYPE.NAME.ARGUMENT}` from that resource's argument,
    rendered in turn. Any other interpolation fails."""
    declared = blocks(tf, "variable")
    managed = resources(tf)

    def fill(match: re.Match[str]) -> str:
        reference = match[1]
        if found := re.fullmatch(r"var\.(\w+)", reference):
            name = found[1]
            return str(variables[name] if name in variables else declared[name]["default"])
        found = re.fullmatch(r"(google_\w+\.\w+)\.(\w+)", reference)
        assert found, reference
        argument = managed[found[1]][found[2]]
        assert isinstance(argument, str), (reference, argument)
        return rendered(tf, argument, variables)

    return re.sub(r"\$\{([^}]*)\}", fill, text)


def store_url(tf: dict[str, Any], **variables: Any) -> str:
    """IDEMPOTENCY_STORE of the service under the defaults and `variables`."""
    assert env(tf)["IDEMPOTENCY_STORE"]["value"] == "${local.idempotency_store}"
    values = {**DEFAULT_STORE_VARIABLES, **variables}
    url = value(tf, locals_(tf)["idempotency_store"], values)
    assert isinstance(url, str)
    return rendered(tf, url, values)


def max_instance_count(tf: dict[str, Any], **variables: Any) -> Any:
    values = {**DEFAULT_STORE_VARIABLES, "max_instances": 10, **variables}
    return value(tf, locals_(tf)["max_instance_count"], values)


def database(tf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return only(of_type(tf, "google_firestore_database"))


def test_rendered_fills_variables_and_resource_arguments() -> None:
    tf: dict[str, Any] = {
        "variable": [{"a": {"default": "A"}}, {"b": {"type": "string"}}],
        "resource": [{"google_x": {"y": {"name": "${var.a}-${var.b}"}}}],
    }
    assert rendered(tf, "${var.a}/${google_x.y.name}", {"b": "B"}) == "A/A-B"
    with pytest.raises(AssertionError):
        rendered(tf, "${upper(var.a)}", {})


def test_the_service_keeps_its_state_in_firestore_by_default(tf: dict[str, Any]) -> None:
    variables = blocks(tf, "variable")
    assert variables["firestore_database"]["default"] == "gcs-notifier"
    assert variables["store_prefix"]["default"] == "gcs-notifier"
    assert variables["idempotency_store"]["default"] == ""
    assert store_url(tf) == "firestore://my-project/gcs-notifier?prefix=gcs-notifier"
    assert store_url(tf, project="p2", firestore_database="notes", store_prefix="mail") == (
        "firestore://p2/notes?prefix=mail"
    )
    # The URL names the database resource, not only the variable: the service waits for it.
    assert "${" + database(tf)[0] + ".name}" in locals_(tf)["firestore_url"]


def test_redis_url_wins_then_idempotency_store(tf: dict[str, Any]) -> None:
    redis = "redis://10.0.0.3:6379/0"
    sqlite = "sqlite:////tmp/gcs-notifier/state/notifier.db"
    other = "firestore:///elsewhere?prefix=x"
    assert store_url(tf, redis_url=redis) == redis
    assert store_url(tf, redis_url=redis, idempotency_store=sqlite) == redis
    assert store_url(tf, idempotency_store=sqlite) == sqlite
    assert store_url(tf, idempotency_store=other) == other
    assert blocks(tf, "variable")["redis_url"]["sensitive"] is True


def test_a_shared_store_scales_to_max_instances_and_sqlite_to_one(tf: dict[str, Any]) -> None:
    sqlite = "sqlite:////tmp/gcs-notifier/state/notifier.db"
    redis = "redis://10.0.0.3:6379/0"
    assert max_instance_count(tf) == 10
    assert max_instance_count(tf, max_instances=25) == 25
    assert max_instance_count(tf, idempotency_store="firestore:///db?prefix=p") == 10
    assert max_instance_count(tf, redis_url=redis) == 10
    # Each instance would deduplicate alone in its own SQLite file.
    assert max_instance_count(tf, idempotency_store=sqlite) == 1
    assert max_instance_count(tf, idempotency_store=sqlite, max_instances=25) == 1
    assert max_instance_count(tf, idempotency_store=sqlite, redis_url=redis) == 10


def test_store_variables_refuse_what_cannot_work(tf: dict[str, Any]) -> None:
    store = version_rule(tf, "idempotency_store")
    for accepted in ("", "firestore:///db?prefix=p", "firestore://p/db", "sqlite:////tmp/x.db"):
        assert store(accepted), accepted
    # Redis goes through the sensitive redis_url; memory forgets everything at once.
    for refused in ("redis://10.0.0.3:6379/0", "memory", "sqlite:x.db", "firestore:/db"):
        assert not store(refused), refused
    name = version_rule(tf, "firestore_database")
    for accepted in ("gcs-notifier", "abcd", "a" * 63, "db-2"):
        assert name(accepted), accepted
    for refused in ("(default)", "", "abc", "a" * 64, "-abcd", "abcd-", "Gcs-notifier", "a_bc"):
        assert not name(refused), refused
    prefix = version_rule(tf, "store_prefix")
    for accepted in ("gcs-notifier", "g", "mail-2"):
        assert prefix(accepted), accepted
    for refused in ("", "a/b", "Mail", "-x", "x" * 41, "__x__"):
        assert not prefix(refused), refused


def test_a_native_mode_database_of_its_own_in_the_services_region(tf: dict[str, Any]) -> None:
    _, db = database(tf)
    _, body = service(tf)
    assert db["name"] == "${var.firestore_database}"
    assert db["type"] == "FIRESTORE_NATIVE"
    assert db["location_id"] == body["location"] == "${var.region}"
    assert db["project"] == "${var.project}"
    assert db["concurrency_mode"] == "OPTIMISTIC"
    assert "${google_project_service.apis}" in db["depends_on"]


def test_destroying_the_database_takes_the_same_switch_as_the_service(
    tf: dict[str, Any],
) -> None:
    _, db = database(tf)
    # ABANDON (the provider's default) would leave the database, and its name, behind.
    assert db["deletion_policy"] == "DELETE"
    protection = db["delete_protection_state"]
    assert conditional(protection)[0] == "deletion_protection"
    assert evaluate(protection, {"deletion_protection": True}) == "DELETE_PROTECTION_ENABLED"
    assert evaluate(protection, {"deletion_protection": False}) == "DELETE_PROTECTION_DISABLED"


def event_shard_collections(tf: dict[str, Any]) -> list[str]:
    """local.digest_event_collections after the prefix: one name per shard number."""
    listed = locals_(tf)["digest_event_collections"]
    match = re.fullmatch(
        r"\$\{\[for (\w+) in range\(local\.digest_event_shards\) : "
        r'"\$\{var\.store_prefix\}-([a-z-]+)\$\{\1\}"\]\}',
        listed,
    )
    assert match, listed
    return [f"{match[2]}{shard}" for shard in range(locals_(tf)["digest_event_shards"])]


def after_prefix(items: str) -> list[str]:
    """`"${var.store_prefix}-NAME", ...` (an HCL list's items) -> the NAMEs."""
    found = [item.strip() for item in items.split(",") if item.strip()]
    names = [re.fullmatch(r'"\$\{var\.store_prefix\}-([a-z-]+)"', item) for item in found]
    assert all(names), found
    return [name[1] for name in names if name]


def test_each_shard_of_a_windows_events_is_a_collection_group_of_the_stores(
    tf: dict[str, Any],
) -> None:
    from app.stores.firestore import DIGEST_EVENT_SHARDS, digest_event_shard_collection

    assert locals_(tf)["digest_event_shards"] == DIGEST_EVENT_SHARDS
    stores = [
        digest_event_shard_collection("p", shard).removeprefix("p-")
        for shard in range(DIGEST_EVENT_SHARDS)
    ]
    assert event_shard_collections(tf) == EVENT_SHARDS == stores


def test_ttl_policies_on_expire_at_in_each_collection_the_stores_write(
    tf: dict[str, Any],
) -> None:
    from app.stores.firestore import expiring_collections

    database_address, _ = database(tf)
    field = of_type(tf, "google_firestore_field")["google_firestore_field.expire_at"]
    assert field["for_each"] == "${local.ttl_collections}"
    listed = locals_(tf)["ttl_collections"]
    match = re.fullmatch(
        r"\$\{toset\(concat\(\[(.*)\], local\.digest_event_collections\)\)\}", listed, re.S
    )
    assert match, listed
    names = after_prefix(match[1]) + event_shard_collections(tf)
    assert sorted(names) == sorted(TTL_COLLECTIONS)
    assert sorted(names) == sorted(name.removeprefix("p-") for name in expiring_collections("p"))
    assert field["collection"] == "${each.key}"
    assert field["field"] == "expire_at"
    assert field["database"] == "${" + database_address + ".name}"
    assert field["project"] == "${var.project}"
    # An empty ttl_config block turns the policy on; an empty index_config drops the field's
    # single-field indexes.
    assert field["ttl_config"] == [{}]
    assert field["index_config"] == [{}]


# The fields no query of the stores reads, by collection group (after the prefix): each is written
# per email or per event, grows with time or holds a long value (app/stores/firestore_*.py).
UNINDEXED_FIELDS = {
    "claims": ["state", "token", "lease_until"],
    "digest-changes": ["window", "route", "shards", "end"],
    "digest-events": ["item"],
    "digest-windows": ["summary"],
    **{events: ["item"] for events in EVENT_SHARDS},
}


def test_fields_no_query_reads_are_exempt_from_indexing(tf: dict[str, Any]) -> None:
    database_address, _ = database(tf)
    listed = locals_(tf)["unindexed_fields"]
    # The named collection groups' fields, and the same for every shard of the events.
    match = re.fullmatch(
        r"\$\{merge\(\{(.*)\}, \{for (\w+) in local\.digest_event_collections : \2 => "
        r"\[(.*)\]\}\)\}",
        listed,
        re.S,
    )
    assert match, listed
    named = {
        collection: [field.strip().strip('"') for field in fields.split(",")]
        for collection, fields in re.findall(
            r'"\$\{var\.store_prefix\}-([a-z-]+)" = \[([^]]*)\]', match[1]
        )
    }
    per_shard = [field.strip().strip('"') for field in match[3].split(",")]
    shards = dict.fromkeys(event_shard_collections(tf), per_shard)
    assert {**named, **shards} == UNINDEXED_FIELDS
    field = of_type(tf, "google_firestore_field")["google_firestore_field.unindexed"]
    # One resource per (collection group, field) pair of the local, keyed "GROUP/FIELD".
    assert re.sub(r"\s+", " ", field["for_each"]) == (
        "${{for exempt in flatten([for collection, fields in local.unindexed_fields : "
        "[for field in fields : {collection = collection, field = field}]]) : "
        '"${exempt.collection}/${exempt.field}" => exempt}}'
    )
    assert (field["collection"], field["field"]) == (
        "${each.value.collection}",
        "${each.value.field}",
    )
    assert field["database"] == "${" + database_address + ".name}"
    assert field["project"] == "${var.project}"
    assert field["index_config"] == [{}]  # no indexes: an exemption
    assert "ttl_config" not in field  # expire_at has its TTL policy and exemption in one resource


def test_the_exempt_fields_are_the_ones_the_stores_never_query() -> None:
    """What the stores write per email and per event is either queried or exempt; a field a
    summary query reads (an event's arrival, time, name, place, bucket, size or type) stays
    indexed."""
    from datetime import UTC, datetime

    from app.digests.window import DigestItem
    from app.events.models import EventType
    from app.stores.firestore_claims import _claim_fields, done_fields
    from app.stores.firestore_windows import event_fields

    now = datetime.now(UTC)
    claim = set(_claim_fields(1, now.timestamp(), 60)) | set(done_fields(None, now))
    assert claim == {*UNINDEXED_FIELDS["claims"], "expire_at"}
    upload = DigestItem("k", EventType.FINALIZED, "b", "n", 1, None, None)
    queried = {
        "arrived", "time", "name", "place", "bucket", "bytes", "finalized", "deleted", "archived"
    }  # fmt: skip
    event = set(event_fields(upload, 1, now))
    for events in ("digest-events", *EVENT_SHARDS):
        assert event == queried | {*UNINDEXED_FIELDS[events], "expire_at"}


def test_no_composite_index_is_made(tf: dict[str, Any]) -> None:
    # The digest store's queries (ready_at <= now ordered by ready_at; pending == true; a
    # window's events by one field each, and aggregations over them) are served by Firestore's
    # automatic single-field indexes: a composite index would only cost index writes.
    assert of_type(tf, "google_firestore_index") == {}


def test_the_runtime_account_uses_this_database_only(tf: dict[str, Any]) -> None:
    database_address, _ = database(tf)
    _, grant = only(grants(tf, "google_project_iam_member", "roles/datastore.user"))
    assert grant["member"] == "serviceAccount:" + account_email(tf, "run")
    assert "count" not in grant
    condition = single(grant["condition"])
    # Firestore docs, "Configure per-database access permissions".
    assert condition["expression"] == 'resource.name == "${' + database_address + '.id}"'
    assert condition["title"]


def test_the_service_starts_once_its_store_is_ready(tf: dict[str, Any]) -> None:
    _, body = service(tf)
    depends_on = set(body["depends_on"])
    grant_address, _ = only(grants(tf, "google_project_iam_member", "roles/datastore.user"))
    needed = {
        grant_address,
        *of_type(tf, "google_firestore_field"),
    }
    assert {"${" + address + "}" for address in needed} <= depends_on


def switches(words: list[str]) -> dict[str, str | None]:
    """A gcloud command's flags: `--name=value`, or `--name` alone (a switch) as None."""
    found: dict[str, str | None] = {}
    for word in words:
        if word.startswith("--"):
            name, equals, given = word.removeprefix("--").partition("=")
            found[name] = given if equals else None
    return found


def test_the_readmes_gcloud_store_is_the_terraform_store(tf: dict[str, Any]) -> None:
    # The gcloud-only path (README, 2b) must make the database, policies, index and grant.
    variables = blocks(tf, "variable")
    name = variables["firestore_database"]["default"]
    prefix = variables["store_prefix"]["default"]
    (create,) = readme_commands(["gcloud", "firestore", "databases", "create"])
    given = switches(create)
    assert given["database"] == name
    assert given["location"] == "$REGION"
    assert given["type"] == "firestore-native"
    assert "delete-protection" in given, "as delete_protection_state, deletion_protection's default"
    assert given["delete-protection"] is None

    ttls = readme_commands(["gcloud", "firestore", "fields", "ttls", "update"])
    assert {(c[5], switches(c)["collection-group"]) for c in ttls} == {
        ("expire_at", f"{prefix}-{collection}") for collection in TTL_COLLECTIONS
    }
    assert all("--enable-ttl" in c and switches(c)["database"] == name for c in ttls)
    exempt = readme_commands(["gcloud", "firestore", "indexes", "fields", "update"])
    assert {(c[5], switches(c)["collection-group"]) for c in exempt} == {
        ("expire_at", f"{prefix}-{collection}") for collection in TTL_COLLECTIONS
    } | {
        (field, f"{prefix}-{collection}")
        for collection, fields in UNINDEXED_FIELDS.items()
        for field in fields
    }
    assert all("--disable-indexes" in c and switches(c)["database"] == name for c in exempt)

    assert readme_commands(["gcloud", "firestore", "indexes", "composite", "create"]) == []

    binding = [
        switches(c)
        for c in readme_commands(["gcloud", "projects", "add-iam-policy-binding"])
        if switches(c).get("role") == "roles/datastore.user"
    ]
    (granted,) = binding
    assert granted["member"] == "serviceAccount:$RUN_SA"
    condition = granted["condition"]
    assert condition is not None
    expression = condition.split(",")[0]
    assert expression == f'expression=resource.name=="projects/$PROJECT/databases/{name}"'
