"""app/stores/firestore.py without a server: the store URL, collection names, how failures read."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.auth.exceptions import RefreshError

from app.stores.base import StoreUnavailable
from app.stores.firestore import (
    CALL_SECONDS,
    DIGEST_EVENT_SHARDS,
    FirestoreLocation,
    call_options,
    claims_collection,
    digest_changes_collection,
    digest_event_shard_collection,
    digest_events_collection,
    digest_rates_collection,
    digest_routes_collection,
    digest_windows_collection,
    document_id,
    expiring_collections,
    failure_reason,
    operation,
    unavailable_on_error,
)

ROOT = Path(__file__).resolve().parents[2]


def error(kind: type[Exception], *args: object) -> Exception:
    """google-api-core's and google-auth's exception classes, built with their types checked."""
    return kind(*args)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "firestore://my-project/gcs-notifier?prefix=gcs-notifier",
            FirestoreLocation("my-project", "gcs-notifier", "gcs-notifier"),
        ),
        ("firestore://my-project/gcs-notifier", FirestoreLocation("my-project", "gcs-notifier")),
        (
            "firestore:///gcs-notifier?prefix=prod_2",
            FirestoreLocation(None, "gcs-notifier", "prod_2"),
        ),
        ("firestore:///gcs-notifier/", FirestoreLocation(None, "gcs-notifier")),
        ("firestore://my-project/(default)", FirestoreLocation("my-project", "(default)")),
        (
            "firestore://example.com:my-project/notifier",
            FirestoreLocation("example.com:my-project", "notifier"),
        ),
    ],
)
def test_firestore_urls_parse(url: str, expected: FirestoreLocation) -> None:
    assert FirestoreLocation.parse(url) == expected


def test_the_default_prefix_is_gcs_notifier() -> None:
    assert FirestoreLocation.parse("firestore:///gcs-notifier").prefix == "gcs-notifier"


def test_a_location_prints_as_the_url_it_came_from() -> None:
    url = "firestore://my-project/gcs-notifier?prefix=test"
    assert str(FirestoreLocation.parse(url)) == url
    assert FirestoreLocation.parse(str(FirestoreLocation(None, "db-1"))) == FirestoreLocation(
        None, "db-1"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://host/0", "starts with firestore://, not 'redis'"),
        ("firestore:/p/db", "starts with firestore://, not 'firestore'"),
        ("firestore://my-project", "names no database"),
        ("firestore://my-project/", "names no database"),
        ("firestore://", "names no database"),
        ("firestore://my-project/db/extra", "one database name, not 'db/extra'"),
        ("firestore://My_Project/gcs-notifier", "'My_Project' is not a Google Cloud project id"),
        ("firestore://p/gcs-notifier", "'p' is not a Google Cloud project id"),
        ("firestore:///Notifier", "'Notifier' is not a Firestore database id"),
        ("firestore:///db", "'db' is not a Firestore database id"),
        ("firestore:///gcs-notifier-", "'gcs-notifier-' is not a Firestore database id"),
        ("firestore:///gcs-notifier?prefix=", "collection prefix '' must be"),
        ("firestore:///gcs-notifier?prefix=a/b", "collection prefix 'a/b' must be"),
        ("firestore:///gcs-notifier?prefix=__x__", "collection prefix '__x__' must be"),
        ("firestore:///gcs-notifier?prefix=a%20b", "collection prefix 'a b' must be"),
        ("firestore:///gcs-notifier?prefix=a&prefix=b", "gives prefix more than once"),
        ("firestore:///gcs-notifier?collection=x&ttl=1", "unknown parameters collection, ttl"),
        ("firestore:///gcs-notifier?prefix", "query 'prefix' is not NAME=VALUE pairs"),
        ("firestore:///gcs-notifier#x", "no #fragment"),
    ],
)
def test_bad_firestore_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FirestoreLocation.parse(url)


def test_collections_start_with_the_prefix() -> None:
    assert claims_collection("p") == "p-claims"
    assert digest_routes_collection("p") == "p-digest-routes"
    assert digest_windows_collection("p") == "p-digest-windows"
    assert digest_changes_collection("p") == "p-digest-changes"
    assert digest_rates_collection("p") == "p-digest-rates"
    assert digest_events_collection("p") == "p-digest-events"  # the layout before shards
    # One collection group per shard of a window's events.
    assert [digest_event_shard_collection("p", n) for n in (0, 7)] == [
        "p-digest-events-0",
        "p-digest-events-7",
    ]
    assert DIGEST_EVENT_SHARDS == 8
    assert expiring_collections("p") == (
        "p-claims",
        "p-digest-changes",
        "p-digest-windows",
        "p-digest-events",
        *(f"p-digest-events-{n}" for n in range(8)),
        "p-digest-rates",
    )


def test_document_ids_are_key_digests_without_slashes() -> None:
    key = "route|bucket|a/b/../c.txt|" + "x" * 2000
    assert document_id(key) == document_id(key)
    assert document_id(key) != document_id(key + "y")
    assert len(document_id(key)) == 64
    assert set(document_id(key)) <= set("0123456789abcdef")


def test_parsing_a_url_loads_none_of_googles_libraries() -> None:
    """Settings validate the URL at start-up, and cold start is measured."""
    probe = (
        "import sys\n"
        "from app.stores.firestore import FirestoreLocation\n"
        "FirestoreLocation.parse('firestore://my-project/gcs-notifier?prefix=x')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('google', 'grpc')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (
            error(exceptions.ServiceUnavailable, "no route"),
            "firestore: ServiceUnavailable: no route",
        ),
        (error(exceptions.DeadlineExceeded, "slow"), "firestore: DeadlineExceeded: slow"),
        (error(exceptions.Aborted, "contention"), "firestore: Aborted: contention"),
        (error(exceptions.InternalServerError, "oops"), "firestore: InternalServerError: oops"),
        (error(exceptions.ResourceExhausted, "quota"), "firestore: ResourceExhausted: quota"),
        (error(exceptions.Unknown, "?"), "firestore: Unknown: ?"),
        (
            error(exceptions.PermissionDenied, "Missing or insufficient permissions.\nmore"),
            "firestore: PermissionDenied: Missing or insufficient permissions.",
        ),
        (
            error(
                exceptions.RetryError,
                "Timeout of 5.0s exceeded",
                error(exceptions.ServiceUnavailable, "x"),
            ),
            f"firestore: ServiceUnavailable: x (gave up after {CALL_SECONDS:g} s of retries)",
        ),
        (ConnectionResetError(104, "Connection reset by peer"), "firestore: ConnectionResetError"),
        (
            OSError("Project was not passed and could not be determined from the environment."),
            "firestore: OSError: Project was not passed and could not be determined",
        ),
    ],
)
def test_firestore_failures_become_store_unavailable(failure: Exception, reason: str) -> None:
    with (
        pytest.raises(StoreUnavailable, match="^" + re.escape(reason)) as raised,
        unavailable_on_error(),
    ):
        raise failure
    assert raised.value.__cause__ is failure


def test_credential_failures_never_show_the_answer_they_quote() -> None:
    secret = "ya29.a0AfB_secret-access-token"
    refused = error(RefreshError, f"invalid_grant: {secret}", {"access_token": secret})
    assert failure_reason(refused) == "firestore: credentials: RefreshError"


def test_long_messages_are_cut() -> None:
    reason = failure_reason(error(exceptions.ServiceUnavailable, "x" * 1000))
    assert reason is not None
    assert len(reason) < 250
    assert reason.endswith("...")


def test_other_errors_pass_through_as_bugs() -> None:
    with pytest.raises(KeyError), unavailable_on_error():
        raise KeyError("bug")
    with pytest.raises(StoreUnavailable, match=r"^already$"), unavailable_on_error():
        raise StoreUnavailable("already")


def test_an_operation_that_takes_too_long_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import app.stores.firestore

    monkeypatch.setattr(app.stores.firestore, "OPERATION_SECONDS", 0.05)

    async def scenario() -> None:
        with pytest.raises(StoreUnavailable, match=r"^firestore: no answer within 0\.05 s$"):
            async with operation():
                await asyncio.sleep(5)

    asyncio.run(scenario())


def test_every_call_retries_transient_errors_within_the_call_bound() -> None:
    options = call_options()
    assert options["timeout"] == CALL_SECONDS <= 5
    retry = options["retry"]
    assert retry._timeout == CALL_SECONDS
    assert retry._predicate(error(exceptions.ServiceUnavailable, "x"))
    assert retry._predicate(error(exceptions.Aborted, "x"))
    assert not retry._predicate(error(exceptions.AlreadyExists, "x"))
    assert not retry._predicate(error(exceptions.FailedPrecondition, "x"))
    assert not retry._predicate(error(exceptions.PermissionDenied, "x"))
