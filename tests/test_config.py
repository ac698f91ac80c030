"""Settings: every environment variable validated once; a bad one stops start-up with a message
that names it, never a traceback and never a secret.

Each test runs in an empty folder with the service's variables removed, so neither the developer's
environment nor a `.env` file can change the outcome.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings, describe_error, load_settings
from tests.servers import ServiceProcess

API_KEY = "SG.never-show-me.0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = {name.upper() for name in Settings.model_fields}
    for variable in list(os.environ):
        if variable.upper() in names:
            monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)


def settings(monkeypatch: pytest.MonkeyPatch, **environment: str) -> Settings:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def refusal(monkeypatch: pytest.MonkeyPatch, **environment: str) -> str:
    with pytest.raises(ValidationError) as caught:
        settings(monkeypatch, **environment)
    return describe_error(caught.value)


def test_defaults_need_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    values = settings(monkeypatch)
    assert values.notifier == "outbox"
    assert values.port == 8080
    assert values.log_level == "INFO"
    assert values.recipients == ("you@localhost",)
    assert values.sender == "notifier@localhost"
    assert values.outbox_dir == Path("outbox")
    assert values.sendgrid_api_key is None
    assert values.sendgrid_host == "https://api.sendgrid.com"
    assert values.sendgrid_timeout == 10
    assert values.event_auth == "none"


def test_a_sendgrid_key_selects_sendgrid(monkeypatch: pytest.MonkeyPatch) -> None:
    values = settings(
        monkeypatch,
        SENDGRID_API_KEY=API_KEY,
        NOTIFY_TO="ops@example.com",
        NOTIFY_FROM="notifier@example.com",
    )
    assert values.notifier == "sendgrid"
    assert values.sendgrid_api_key is not None
    assert values.sendgrid_api_key.get_secret_value() == API_KEY


def test_an_explicit_notifier_wins_over_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    values = settings(monkeypatch, SENDGRID_API_KEY=API_KEY, NOTIFIER="outbox")
    assert values.notifier == "outbox"


def test_notify_to_is_comma_separated_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    values = settings(
        monkeypatch, NOTIFY_TO=" ops@example.com ,dev@example.com,  , qa@example.org "
    )
    assert values.recipients == ("ops@example.com", "dev@example.com", "qa@example.org")


def test_a_single_recipient_is_a_list_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch, NOTIFY_TO="ops@example.com").recipients == ("ops@example.com",)


@pytest.mark.parametrize(
    "recipients", ["not-an-address", "ops@example.com, nobody", "a@b.com\r\nBcc: evil@example.com"]
)
def test_malformed_recipients_are_refused(monkeypatch: pytest.MonkeyPatch, recipients: str) -> None:
    assert "NOTIFY_TO" in refusal(monkeypatch, NOTIFY_TO=recipients)


def test_sendgrid_without_recipients_or_sender_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, SENDGRID_API_KEY=API_KEY)
    assert "NOTIFY_TO" in message
    assert "NOTIFY_FROM" in message


@pytest.mark.parametrize(
    ("present", "missing"), [("NOTIFY_TO", "NOTIFY_FROM"), ("NOTIFY_FROM", "NOTIFY_TO")]
)
def test_sendgrid_names_the_one_missing_variable(
    monkeypatch: pytest.MonkeyPatch, present: str, missing: str
) -> None:
    message = refusal(monkeypatch, SENDGRID_API_KEY=API_KEY, **{present: "ops@example.com"})
    assert missing in message
    assert present not in message


def test_sendgrid_chosen_without_a_key_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(
        monkeypatch, NOTIFIER="sendgrid", NOTIFY_TO="a@example.com", NOTIFY_FROM="n@example.com"
    )
    assert "SENDGRID_API_KEY" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "0"),
        ("PORT", "65536"),
        ("PORT", ""),
        ("LOG_LEVEL", "LOUD"),
        ("IDEMPOTENCY_STORE", "postgres://db/notifier"),
        ("IDEMPOTENCY_STORE", "sqlite:notifier.db"),
        ("SENDGRID_HOST", "api.sendgrid.com"),
        ("SENDGRID_HOST", "ftp://api.sendgrid.com"),
        ("SENDGRID_TIMEOUT", "0"),
        ("SENDGRID_TIMEOUT", "soon"),
        ("NOTIFIER", "smtp"),
        ("EVENT_AUTH", "basic"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    message = refusal(monkeypatch, **{variable: value})
    assert message.startswith("invalid configuration:")
    assert f"{variable}:" in message


@pytest.mark.parametrize("level", ["debug", "Warning", "ERROR"])
def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    assert settings(monkeypatch, LOG_LEVEL=level).log_level == level.upper()


@pytest.mark.parametrize(
    "store",
    [
        "memory",
        "sqlite:///./state/x.db",
        "redis://localhost:6379/0",
        "firestore://my-project/gcs-notifier?prefix=gcs-notifier",
        "firestore:///gcs-notifier",
    ],
)
def test_idempotency_store_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, store: str) -> None:
    assert settings(monkeypatch, IDEMPOTENCY_STORE=store).idempotency_store == store


@pytest.mark.parametrize("host", ["http://127.0.0.1:9000/", "https://api.sendgrid.com///"])
def test_trailing_slashes_are_stripped_from_sendgrid_host(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    assert not settings(monkeypatch, SENDGRID_HOST=host).sendgrid_host.endswith("/")


def test_oidc_without_invokers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, EVENT_AUTH="oidc")
    assert "EVENT_AUTH" in message
    assert "EVENT_INVOKERS" in message


def test_oidc_with_invokers_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    invoker = "trigger@project.iam.gserviceaccount.com"
    values = settings(monkeypatch, EVENT_AUTH="oidc", EVENT_INVOKERS=invoker)
    assert values.event_invokers == [invoker]


def test_every_problem_is_listed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, PORT="x", LOG_LEVEL="LOUD", SENDGRID_HOST="nope")
    assert len(message.splitlines()) == 4
    for variable in ("PORT", "LOG_LEVEL", "SENDGRID_HOST"):
        assert variable in message


@pytest.mark.parametrize(
    "environment",
    [
        {"NOTIFIER": "sendgrid"},
        {"PORT": "x"},
        {"NOTIFY_TO": "nobody"},
        {"SENDGRID_HOST": API_KEY},
        {"SENDGRID_TIMEOUT": API_KEY},
    ],
)
def test_describe_error_never_shows_the_api_key(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]
) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(monkeypatch, SENDGRID_API_KEY=API_KEY, **environment)
    assert API_KEY not in describe_error(caught.value)
    assert API_KEY not in str(caught.value)


def test_the_api_key_is_not_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    values = settings(
        monkeypatch, SENDGRID_API_KEY=API_KEY, NOTIFY_TO="a@example.com", NOTIFY_FROM="n@b.com"
    )
    assert API_KEY not in repr(values)
    assert API_KEY not in str(values.model_dump())


def test_load_settings_exits_with_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert isinstance(caught.value.code, str)
    assert "PORT" in caught.value.code


def test_a_dot_env_file_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("NOTIFY_TO=dotenv@example.com\nLOG_LEVEL=DEBUG\n")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    values = Settings()
    assert values.recipients == ("dotenv@example.com",)
    assert values.log_level == "WARNING"


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    assert Settings(_env_file=None, port=9100).port == 9100


def test_python_m_app_with_a_bad_variable_exits_with_a_message(tmp_path: Path) -> None:
    output = ServiceProcess({"PORT": "eighty", "SENDGRID_API_KEY": API_KEY}, tmp_path).refused()
    assert "PORT" in output
    assert "invalid configuration" in output
    assert API_KEY not in output


@pytest.mark.parametrize("spelling", ["OIDC", "Oidc", " oidc "])
def test_event_auth_is_case_insensitive(monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    values = settings(
        monkeypatch, EVENT_AUTH=spelling, EVENT_INVOKERS="t@p.iam.gserviceaccount.com"
    )
    assert values.event_auth == "oidc"


def test_notifier_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch, NOTIFIER="OUTBOX").notifier == "outbox"


def test_iam_without_invokers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, EVENT_AUTH="iam")
    assert "EVENT_AUTH=iam requires EVENT_INVOKERS" in message


@pytest.mark.parametrize("padding", ["\n", "\r\n", " ", "\t\n"])
def test_whitespace_around_the_key_is_stripped(
    monkeypatch: pytest.MonkeyPatch, padding: str
) -> None:
    values = settings(
        monkeypatch,
        SENDGRID_API_KEY=f"{padding}{API_KEY}{padding}",
        NOTIFY_TO="a@example.com",
        NOTIFY_FROM="n@example.com",
    )
    assert values.sendgrid_api_key is not None
    assert values.sendgrid_api_key.get_secret_value() == API_KEY


@pytest.mark.parametrize("inside", ["\n", "\r\n", "\x01", " ", "\x7f", "é"])
def test_a_key_with_a_character_a_header_cannot_carry_is_refused_without_echo(
    monkeypatch: pytest.MonkeyPatch, inside: str
) -> None:
    key = API_KEY[:10] + inside + API_KEY[10:]
    message = refusal(
        monkeypatch, SENDGRID_API_KEY=key, NOTIFY_TO="a@example.com", NOTIFY_FROM="n@example.com"
    )
    assert "SENDGRID_API_KEY" in message
    assert API_KEY[:10] not in message
    assert API_KEY[10:] not in message


def test_a_blank_key_counts_as_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch, SENDGRID_API_KEY=" \n").notifier == "outbox"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:abc/0", "invalid port"),
        ("redis://:6379/0", "needs a host"),
        ("redis://127.0.0.1:6379/zero", "must be a number"),
        ("sqlite:///", "needs the path"),
        ("sqlite:///state/", "needs the path"),
        ("firestore://my-project", "names no database"),
        ("firestore://my-project/gcs-notifier?prefx=x", "unknown parameters prefx"),
        ("firestore://My_Project/gcs-notifier", "not a Google Cloud project id"),
        ("mysql://db/x", "firestore://PROJECT/DATABASE"),
    ],
)
def test_store_urls_that_cannot_work_are_refused(
    monkeypatch: pytest.MonkeyPatch, url: str, says: str
) -> None:
    message = refusal(monkeypatch, IDEMPOTENCY_STORE=url)
    assert "IDEMPOTENCY_STORE" in message
    assert says in message


def test_field_and_cross_field_problems_are_listed_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = refusal(monkeypatch, PORT="x", NOTIFIER="sendgrid", EVENT_AUTH="oidc")
    assert "PORT" in message
    assert "NOTIFIER=sendgrid requires SENDGRID_API_KEY, NOTIFY_TO, NOTIFY_FROM" in message
    assert "EVENT_AUTH=oidc requires EVENT_INVOKERS" in message
    assert len(message.splitlines()) == 4


def test_a_sendgrid_host_with_a_line_break_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, SENDGRID_HOST="https://api.sendgrid.com\r\nX: y")
    assert "SENDGRID_HOST" in message


def test_a_recipient_named_twice_in_any_case_is_kept_once(monkeypatch: pytest.MonkeyPatch) -> None:
    values = settings(monkeypatch, NOTIFY_TO="ops@example.com, OPS@Example.com,dev@example.com")
    assert values.recipients == ("ops@example.com", "dev@example.com")


@pytest.mark.parametrize(
    ("written", "seconds"), [("8d", 8 * 86400), ("36h", 36 * 3600), ("90000", 90000)]
)
def test_dedupe_retention_reads_a_duration(
    monkeypatch: pytest.MonkeyPatch, written: str, seconds: int
) -> None:
    assert settings(monkeypatch, DEDUPE_RETENTION=written).dedupe_retention == seconds


def test_dedupe_retention_defaults_to_eight_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven days of Pub/Sub retention and dead-letter replay, plus a day."""
    assert settings(monkeypatch).dedupe_retention == 8 * 86400


@pytest.mark.parametrize("written", ["24h", "1d", "3600", "soon", "-8d", "8 weeks"])
def test_a_retention_shorter_than_redelivery_or_unreadable_is_refused(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    message = refusal(monkeypatch, DEDUPE_RETENTION=written)
    assert "DEDUPE_RETENTION:" in message


def test_a_lease_shorter_than_a_send_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A send that outlives its claim's lease may be sent again by another instance."""
    sendgrid = {
        "SENDGRID_API_KEY": API_KEY,
        "NOTIFY_TO": "a@example.com",
        "NOTIFY_FROM": "n@example.com",
    }
    message = refusal(monkeypatch, **sendgrid, SENDGRID_TIMEOUT="60", CLAIM_LEASE_SECONDS="60")
    assert "CLAIM_LEASE_SECONDS (60) must be at least SENDGRID_TIMEOUT (60) + 5" in message
    assert settings(monkeypatch, **sendgrid, SENDGRID_TIMEOUT="55", CLAIM_LEASE_SECONDS="60")


def test_the_outbox_needs_a_lease_of_its_own_write_bound_and_the_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SENDGRID_TIMEOUT plays no part when the outbox sends: its own bound (5 s) does."""
    message = refusal(monkeypatch, NOTIFIER="outbox", CLAIM_LEASE_SECONDS="9")
    assert "CLAIM_LEASE_SECONDS (9) must be at least the outbox's write bound (5) + 5" in message
    allowed = settings(
        monkeypatch, NOTIFIER="outbox", SENDGRID_TIMEOUT="60", CLAIM_LEASE_SECONDS="10"
    )
    assert allowed.claim_lease_seconds == 10


def test_the_flush_budget_is_twenty_seconds_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch).digest_flush_budget_seconds == 20
    assert settings(monkeypatch, DIGEST_FLUSH_BUDGET_SECONDS="5").digest_flush_budget_seconds == 5
    assert "DIGEST_FLUSH_BUDGET_SECONDS" in refusal(monkeypatch, DIGEST_FLUSH_BUDGET_SECONDS="0")
