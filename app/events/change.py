"""One storage change read from a Pub/Sub notification or a 1st-gen event -> StorageEvent.

Every input names a change the way Eventarc does: source
`//storage.googleapis.com/projects/_/buckets/BUCKET`, subject `objects/NAME`, and data whose
bucket, name, generation and metageneration make the same `change_key()`, so one change that
arrives by two paths is emailed once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dateutil.parser import isoparse
from pydantic import ValidationError

from app.events.errors import EventDecodeError
from app.events.models import EventType, StorageEvent, StorageObjectData

SOURCE = "//storage.googleapis.com/projects/_/buckets/"
# JSON may spell a UTF-16 surrogate as an escape; a lone one is valid JSON but no character, and
# could never be written into an email or a response. Pairs (emoji) are fine: a match only
# means the parsed text must be checked.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_GENERATION = re.compile(r"[0-9]{1,19}")
_INT64_MAX = 2**63 - 1


def excerpt(value: object, limit: int = 60) -> str:
    """A short, one-line, quoted excerpt of something the sender wrote."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(value: str, limit: int = 120) -> str:
    """A name the sender chose, cut to a length fit for a log line."""
    return value if len(value) <= limit else value[:limit] + "..."


def kind_of(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


def text(container: Mapping[str, Any], key: str, where: str) -> str | None:
    """container[key] as a string, None when absent; anything but a string is refused."""
    value = container.get(key)
    if value is None or isinstance(value, str):
        return value
    raise EventDecodeError(f"{where}{key} must be a string, not {kind_of(value)}")


def required_text(container: Mapping[str, Any], key: str, where: str) -> str:
    value = text(container, key, where)
    if not value:
        raise EventDecodeError(
            f"{where}{key} is missing" if value is None else f"{where}{key} is empty"
        )
    return value


def timestamp(value: str | None, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = isoparse(value)
    except (ValueError, OverflowError):
        raise EventDecodeError(f"{where} is not an RFC 3339 timestamp: {excerpt(value)}") from None
    if parsed.tzinfo is None:
        raise EventDecodeError(f"{where} has no time zone offset: {excerpt(value)}")
    return parsed


def generation(value: str | None, where: str) -> int | None:
    if value is None:
        return None
    if not _GENERATION.fullmatch(value) or int(value) > _INT64_MAX:
        raise EventDecodeError(f"{where} is not a generation number: {excerpt(value)}")
    return int(value)


def json_object(raw: bytes, where: str) -> dict[str, Any]:
    """UTF-8 JSON that must be one object; lone surrogate escapes refused."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise EventDecodeError(f"{where} is not UTF-8") from None
    except ValueError:
        raise EventDecodeError(f"{where} is not valid JSON") from None
    except RecursionError:
        raise EventDecodeError(f"{where} is JSON nested too deeply") from None
    if not isinstance(document, dict):
        raise EventDecodeError(
            f"{where} must be a JSON object (the Cloud Storage object), not {kind_of(document)}"
        )
    if SURROGATE_ESCAPE.search(raw):
        refuse_lone_surrogates(document)
    return document


def refuse_lone_surrogates(document: object) -> None:
    try:
        json.dumps(document, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise EventDecodeError(
            "event contains a lone UTF-16 surrogate escape (such as \\ud800), which is not text"
        ) from None


def object_data(data: Mapping[str, Any], where: str, what: str | None = None) -> StorageObjectData:
    """The object resource, or EventDecodeError listing each field that fails, named from
    `where`; the message says `what` failed (`where` unless given)."""
    try:
        return StorageObjectData.model_validate(data)
    except ValidationError as error:
        problems = [
            {
                "field": ".".join([where, *(str(part) for part in problem["loc"])]),
                "message": problem["msg"],
            }
            for problem in error.errors(include_url=False, include_input=False)
        ]
        raise EventDecodeError(f"{what or where} failed validation", problems) from None


def check_agrees(
    data: StorageObjectData,
    where: str,
    bucket: str | None,
    name: str | None,
    object_generation: int | None,
    told_by: str,
) -> None:
    """The envelope (attributes, headers, resource) and the object resource must name the same
    object: which one to believe is not ours to guess."""
    for field, said, found in (
        ("bucket", bucket, data.bucket),
        ("name", name, data.name),
        ("generation", object_generation, data.generation),
    ):
        if said is not None and found is not None and said != found:
            raise EventDecodeError(f"{where}.{field} disagrees with {told_by}")


def storage_event(
    event_type: EventType,
    event_id: str,
    time: datetime | None,
    data: StorageObjectData,
    extensions: dict[str, str],
) -> StorageEvent:
    return StorageEvent(
        id=event_id,
        source=SOURCE + data.bucket,
        type=event_type,
        subject=f"objects/{data.name}",
        time=time,
        datacontenttype="application/json",
        extensions=extensions,
        data=data,
    )
