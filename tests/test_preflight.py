"""Start-up checks, in process: what a store URL or a folder must be for the service to start
(the same refusals through `python -m app` are in tests/test_startup.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.preflight import StartupError, check_store, check_writable_folder


def test_a_new_database_in_a_folder_that_can_exist_passes(tmp_path: Path) -> None:
    check_store(f"sqlite:///{tmp_path}/state/new.db")
    assert (tmp_path / "state").is_dir()
    assert not (tmp_path / "state" / "new.db").exists()  # the store creates it, not the check
    assert not list((tmp_path / "state").iterdir())  # and the probe file is gone


def test_an_existing_database_and_an_empty_file_pass(tmp_path: Path) -> None:
    database = tmp_path / "n.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE t (x)")
    check_store(f"sqlite:///{database}")
    (tmp_path / "empty.db").touch()
    check_store(f"sqlite:///{tmp_path}/empty.db")


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"name,size\nq3.csv,12\n", "file is not a database"), (b"SQLite format 2\x00", "not a")],
)
def test_a_file_that_is_not_a_database_is_refused(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(StartupError, match=says) as refused:
        check_store(f"sqlite:///{path}")
    assert str(refused.value).startswith(f"IDEMPOTENCY_STORE cannot be used: {path}: ")


def test_a_folder_given_as_the_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="Is a directory"):
        check_store(f"sqlite:///{tmp_path}")


def test_a_database_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="IDEMPOTENCY_STORE cannot be used"):
        check_store(f"sqlite:///{tmp_path}/file/n.db")


@pytest.mark.parametrize("url", ["memory", "redis://127.0.0.1:6399/0", "sqlite:///:memory:"])
def test_stores_with_nothing_on_disk_need_no_check(url: str) -> None:
    check_store(url)


def test_a_folder_under_a_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError) as refused:
        check_writable_folder("OUTBOX_DIR", tmp_path / "file" / "outbox")
    assert str(refused.value).startswith(f"OUTBOX_DIR={tmp_path / 'file' / 'outbox'} is not")


def test_a_writable_folder_is_created_and_left_empty(tmp_path: Path) -> None:
    check_writable_folder("DEAD_LETTER_DIR", tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert not list((tmp_path / "a" / "b").iterdir())
