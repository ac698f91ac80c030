"""`python -m app.replay DIR --url URL`, run as an operator runs it: a folder that is not there is
an error, not "nothing to replay"; an empty one is nothing to replay.

Replays of real dead letters against SendGrid doubles are in tests/delivery/test_delivery.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import read_outbox
from tests.factories import object_data, recent, structured
from tests.servers import ROOT, ThreadedServer

UNREACHABLE = "http://127.0.0.1:9/"  # nothing listens on the discard port


def replay(
    directory: Path | str, url: str = UNREACHABLE, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.replay", str(directory), "--url", url, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def fresh(body: bytes) -> bytes:
    """A dead letter of a change that happened a minute ago."""
    document = json.loads(body)
    document["time"] = recent()
    return json.dumps(document).encode()


def test_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "dead-lettr"  # a typo
    result = replay(missing)
    assert result.returncode == 2
    assert result.stderr.strip() == f"no such folder: {missing}"
    assert "nothing to replay" not in result.stdout
    assert "Traceback" not in result.stderr


def test_a_file_given_as_the_folder_is_an_error(tmp_path: Path) -> None:
    letter = tmp_path / "20250101T000000000000Z-0123456789abcdef.json"
    letter.write_bytes(structured()[1])
    result = replay(letter)
    assert result.returncode == 2
    assert result.stderr.strip() == f"not a folder: {letter}"
    assert letter.exists()


def test_an_empty_folder_is_nothing_to_replay(tmp_path: Path) -> None:
    result = replay(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nothing to replay in {tmp_path}"
    assert result.stderr == ""


def test_a_folder_without_json_files_is_nothing_to_replay(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dead letter")
    (tmp_path / "folder.json").mkdir()  # a folder, whatever its name says
    result = replay(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nothing to replay in {tmp_path}"


def test_a_dead_letter_is_sent_again_and_removed(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    folder = tmp_path / "dead-letter-copy"
    folder.mkdir()
    letter = folder / "20250101T000000000000Z-0123456789abcdef.json"
    letter.write_bytes(fresh(structured(object_data(name="again.txt"), event_id="dl-1")[1]))
    result = replay(folder, outbox_server.url + "/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"status":"sent"' in result.stdout
    assert "replayed 1 of 1" in result.stdout
    assert not letter.exists()
    subjects = {str(message["Subject"]) for message in read_outbox(tmp_path / "outbox")}
    assert subjects == {"[gs://some-bucket] finalized: again.txt"}


def test_a_dead_lettered_digest_is_listed_and_kept_not_posted(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    folder = tmp_path / "dead-letter-copy"
    folder.mkdir()
    digest = folder / "20250101T000000000000Z-digest-0123456789abcdef.json"
    digest.write_text('{"kind": "digest", "window_id": "reports:1", "summary": {}}')
    letter = folder / "20250101T000000000001Z-0123456789abcdef.json"
    letter.write_bytes(fresh(structured(object_data(name="again.txt"), event_id="dl-2")[1]))
    result = replay(folder, outbox_server.url + "/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{digest.name}: a digest, not an event (kept" in result.stdout
    assert "replayed 1 of 1" in result.stdout
    assert digest.exists()
    assert not letter.exists()


def old_letter(folder: Path, name: str, days: float) -> Path:
    """A dead letter of a change `days` old."""
    letter = folder / f"20250101T000000000000Z-{name}.json"
    _, body = structured(object_data(name=name), event_id=f"old-{name}")
    document = json.loads(body)
    document["time"] = recent(days * 86400)
    letter.write_text(json.dumps(document))
    return letter


def test_a_change_older_than_the_retention_is_kept_and_not_sent_unless_forced(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    """Its done marks may be gone: had it partly gone out, replaying it would email it again."""
    folder = tmp_path / "dead-letter-copy"
    folder.mkdir()
    old = old_letter(folder, "old.txt", days=9)
    fresh = old_letter(folder, "fresh.txt", days=6)
    result = replay(folder, outbox_server.url + "/")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{old.name}: the change is 9 days old, older than the retention (8d)" in result.stdout
    assert "replay it with --force (kept)" in result.stdout
    assert "replayed 1 of 2" in result.stdout
    assert old.exists()
    assert not fresh.exists()
    subjects = {str(message["Subject"]) for message in read_outbox(tmp_path / "outbox")}
    assert subjects == {"[gs://some-bucket] finalized: fresh.txt"}

    shorter = replay(folder, outbox_server.url + "/", "--retention", "10d")
    assert shorter.returncode == 0, shorter.stdout
    assert not old.exists()


def test_force_sends_a_change_older_than_the_retention(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    folder = tmp_path / "dead-letter-copy"
    folder.mkdir()
    old = old_letter(folder, "old.txt", days=30)
    result = replay(folder, outbox_server.url + "/", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"status":"sent"' in result.stdout
    assert not old.exists()


def test_the_service_keeps_a_change_older_than_the_retention_without_force(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    """A dead letter posted without app.replay's check: the service refuses it too."""
    headers, body = structured(object_data(name="stale.txt"), event_id="stale-1")
    document = json.loads(body)
    document["time"] = recent(9 * 86400)
    document["deadletteredat"] = recent(8.5 * 86400)
    answer = httpx.post(outbox_server.url + "/", headers=headers, content=json.dumps(document))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "dead-lettered"
    assert not (tmp_path / "outbox").exists() or not list((tmp_path / "outbox").iterdir())
    [kept] = (tmp_path / "dead-letter").glob("*.json")
    reason = json.loads(kept.read_text())["deadletterreason"]  # the new reason replaces the old
    assert reason.startswith("the change is older than DEDUPE_RETENTION (8 days)")
    forced = httpx.post(
        outbox_server.url + "/",
        headers={**headers, "x-gcs-notifier-replay": "force"},
        content=json.dumps(document),
    )
    assert forced.json()["status"] == "sent"
