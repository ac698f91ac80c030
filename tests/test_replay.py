"""`python -m app.replay DIR --url URL`, run as an operator runs it: a folder that is not there is
an error, not "nothing to replay"; an empty one is nothing to replay.

Replays of real dead letters against SendGrid doubles are in tests/delivery/test_delivery.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import read_outbox
from tests.factories import object_data, structured
from tests.servers import ROOT, ThreadedServer

UNREACHABLE = "http://127.0.0.1:9/"  # nothing listens on the discard port


def replay(directory: Path | str, url: str = UNREACHABLE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.replay", str(directory), "--url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


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
    letter.write_bytes(structured(object_data(name="again.txt"), event_id="dl-1")[1])
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
    letter.write_bytes(structured(object_data(name="again.txt"), event_id="dl-2")[1])
    result = replay(folder, outbox_server.url + "/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{digest.name}: a digest, not an event (kept" in result.stdout
    assert "replayed 1 of 1" in result.stdout
    assert digest.exists()
    assert not letter.exists()
