"""What a request message is, and how a raw broker body becomes one (or a rejection).

Validation happens here, before anything reaches the store, a URL or AEP: a message that fails is
rejected with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_MESSAGE_BYTES = 64 * 1024

InputFormat = Literal["json", "parquet", "csv"]
INPUT_FORMATS: frozenset[str] = frozenset({"json", "parquet", "csv"})

# Dataset ids are opaque to us, but they end up in a JSON body and in catalog query strings:
# letters, digits, '-' and '_' cover every id AEP issues and nothing that could smuggle syntax.
DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Request ids are the producer's idempotency keys: any printable text without control characters.
REQUEST_ID = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
MAX_TAGS = 64
# Files per message: a message is at most 64 KiB anyway; AEP's guardrail is 25,000 files per batch.
MAX_FILES = 1000
# A file's name in AEP goes into the upload URL's path, which AEP caps at 2000 characters.
MAX_FILE_NAME = 1024
# `scheme://…`: a URL fsspec opens; anything else is a path relative to ORCH_UPLOAD__ROOT.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
# Only a `\uXXXX` escape can put a surrogate in decoded JSON (the body itself is valid UTF-8).
_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)
# JSON's literal names look like dataset ids, but a body that is one of them is a serialised JSON value.
_JSON_LITERALS = frozenset({"null", "true", "false"})


class InvalidMessage(ValueError):
    """The message can never become a batch; the text says why."""


@dataclass(frozen=True)
class FileRef:
    """A file a request names: `source` as the message gave it (a path relative to
    ORCH_UPLOAD__ROOT, or a URL), `name` its path inside the batch in AEP. The name keeps the relative
    path, so partition folders (`part=a/`) survive; for a URL it is the path below its host or bucket
    (`s3://bucket/exports/part=a/x.json` is `exports/part=a/x.json`)."""

    source: str
    name: str

    @property
    def url(self) -> bool:
        return _URL.fullmatch(self.source) is not None

    @property
    def protocol(self) -> str | None:
        match = _URL.fullmatch(self.source)
        return match.group(1).lower() if match else None


@dataclass(frozen=True)
class BatchRequest:
    """One validated request: everything the dispatcher needs to create its batch, and the files
    the upload stage puts into it (none: the batch is left to the upload steps)."""

    request_id: str
    dataset_id: str
    input_format: InputFormat | None = None
    multiline_json: bool | None = None
    tags: dict[str, list[str]] = field(default_factory=dict)
    files: tuple[FileRef, ...] = ()

    @property
    def external_id(self) -> str:
        return external_id_for(self.request_id)

    @property
    def fingerprint(self) -> str:
        """Tells two messages that share a requestId but ask for different batches apart."""
        fields: list[Any] = [self.dataset_id, self.input_format, self.multiline_json, self.tags]
        if self.files:
            # Only when there are files: requests recorded before files existed keep their fingerprint.
            fields.append([ref.source for ref in self.files])
        canonical = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def external_id_for(request_id: str) -> str:
    """The batch's `externalId`: the same for every delivery of a request, so a lost answer can be
    found again in the catalog instead of creating a second batch."""
    return "orch-" + hashlib.sha256(request_id.encode()).hexdigest()[:40]


def parse_message(body: bytes, message_id: str) -> BatchRequest:
    """Turn a broker body into a request. `message_id` keys requests that carry no `requestId`."""
    return request_from_json(message_object(body), message_id)


def message_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON message object, not yet validated: a bare dataset id, or a JSON string,
    becomes `{"datasetId": id}`. Raises `InvalidMessage` for a body that is neither an id nor an object.

    A body that matches the dataset id pattern is that dataset id, even where it would also parse as a
    JSON number (`12345`, `1e5`): dataset ids may be all digits. `null`, `true` and `false` are the
    exception: they are JSON that a producer serialised by mistake, not ids, so they are rejected.
    """
    if len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message is {len(body)} bytes, over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("message is not UTF-8") from None
    stripped = text.strip()
    if not stripped:
        raise InvalidMessage("message is empty")
    if DATASET_ID.fullmatch(stripped) and stripped not in _JSON_LITERALS:
        return {"datasetId": stripped}
    try:
        data = json.loads(stripped)
        unicode = not _LONE_SURROGATE.search(stripped) or _is_text(data)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON and not a dataset id: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        # Thousands of nested arrays fit in 64 KiB; the decoder gives up on them this way.
        raise InvalidMessage("JSON nested too deeply") from None
    if not unicode:
        # A `\ud800` escape is valid JSON but no Unicode text: it cannot be stored, logged or sent.
        raise InvalidMessage("message contains a lone surrogate escape (\\uD800-\\uDFFF), which is not text")
    if isinstance(data, str):
        return {"datasetId": data}
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a JSON object or a dataset id, got {_type(data)}")
    return data


def request_from_json(data: dict[str, Any], message_id: str) -> BatchRequest:
    if "datasetId" not in data:
        raise InvalidMessage("datasetId is missing")
    dataset_id = _dataset_id(data["datasetId"])
    request_id = data.get("requestId")
    if request_id is None:
        request_id = f"msg:{message_id}"
    elif not isinstance(request_id, str):
        raise InvalidMessage(f"requestId must be a string, got {_type(request_id)}")
    elif not REQUEST_ID.fullmatch(request_id):
        raise InvalidMessage("requestId must be 1 to 256 characters without control characters")
    input_format, multiline = _input_format(data.get("inputFormat"))
    return BatchRequest(
        request_id=request_id,
        dataset_id=dataset_id,
        input_format=input_format,
        multiline_json=multiline,
        tags=_tags(data.get("tags")),
        files=_files(data.get("files")),
    )


def _dataset_id(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidMessage(f"datasetId must be a string, got {_type(value)}")
    if not DATASET_ID.fullmatch(value):
        raise InvalidMessage("datasetId must be 1 to 128 letters, digits, '-' or '_'")
    return value


def parse_input_format(value: str) -> InputFormat:
    lowered = value.lower()
    if lowered not in INPUT_FORMATS:
        raise InvalidMessage(f"inputFormat.format must be one of json, parquet, csv, got {value[:20]!r}")
    return lowered  # type: ignore[return-value]  # checked against INPUT_FORMATS just above


def _input_format(value: Any) -> tuple[InputFormat | None, bool | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise InvalidMessage(f"inputFormat must be an object, got {_type(value)}")
    fmt = value.get("format")
    if not isinstance(fmt, str):
        raise InvalidMessage("inputFormat.format must be a string")
    multiline = value.get("isMultiLineJson")
    if multiline is not None and not isinstance(multiline, bool):
        raise InvalidMessage(f"inputFormat.isMultiLineJson must be a boolean, got {_type(multiline)}")
    return parse_input_format(fmt), multiline


def _tags(value: Any) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMessage(f"tags must be an object of string lists, got {_type(value)}")
    if len(value) > MAX_TAGS:
        raise InvalidMessage(f"tags has {len(value)} keys, over the limit of {MAX_TAGS}")
    tags: dict[str, list[str]] = {}
    for key, items in value.items():
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise InvalidMessage(f"tags.{_printable(key[:40])} must be a list of strings")
        tags[key] = list(items)
    return tags


def _files(value: Any) -> tuple[FileRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidMessage(f"files must be a list of paths or URLs, got {_type(value)}")
    if not value:
        raise InvalidMessage("files is empty: leave it out, or name at least one file")
    if len(value) > MAX_FILES:
        raise InvalidMessage(f"files has {len(value)} entries, over the limit of {MAX_FILES}")
    refs: list[FileRef] = []
    names: set[str] = set()
    for index, entry in enumerate(value):
        ref = file_ref(entry, f"files[{index}]")
        if ref.name in names:
            raise InvalidMessage(f"files[{index}]: the name {_printable(ref.name[:80])!r} is given twice")
        names.add(ref.name)
        refs.append(ref)
    return tuple(refs)


def file_ref(entry: Any, where: str = "file") -> FileRef:
    """A file entry checked for its form alone (where it lies is checked against ORCH_UPLOAD__ROOT
    by the upload stage's sources): a relative path with no `..`, or a URL with a path."""
    if not isinstance(entry, str):
        raise InvalidMessage(f"{where} must be a string, got {_type(entry)}")
    if not entry or not entry.isprintable() or "\\" in entry:
        raise InvalidMessage(f"{where} must be a non-empty path without control characters or backslashes")
    match = _URL.fullmatch(entry)
    if match is None:
        if entry.startswith("/"):
            raise InvalidMessage(f"{where}: absolute paths are refused; give one relative to the upload root")
        path = entry
    else:
        rest = match.group(2)
        if "?" in rest or "#" in rest:
            raise InvalidMessage(f"{where}: a URL with a query or fragment is refused")
        # Below the host or bucket: `s3://bucket/a/b` is `a/b`; `file:///srv/a/b` is `srv/a/b`.
        path = rest.partition("/")[2]
        if not path:
            raise InvalidMessage(f"{where}: the URL names no file")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidMessage(f"{where}: empty, '.' and '..' path segments are refused")
    if len(path) > MAX_FILE_NAME:
        raise InvalidMessage(f"{where}: the name is over {MAX_FILE_NAME} characters")
    return FileRef(source=entry, name=path)


def _is_text(data: Any) -> bool:
    """Whether every string in the decoded JSON can be encoded as UTF-8 (no lone surrogates)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """Message text quoted in a reason: reasons are stored and logged, so no control characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)
