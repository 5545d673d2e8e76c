"""A message's optional `files`: paths and URLs checked for their form, named inside the batch, and
part of the fingerprint only when present."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.messages import (
    MAX_FILE_NAME,
    MAX_FILES,
    BatchRequest,
    FileRef,
    InvalidMessage,
    file_ref,
    parse_message,
)

DS = "5c8c3c555033b814b69f947f"

# sha256(json.dumps([dataset_id, input_format, multiline_json, tags], sort_keys=True)), computed once
# by hand: the fingerprints requests had before files existed, which they must keep.
FINGERPRINT_BARE = "6a2c57b4aa614a68a4adaf8034e16544e52bfb31da3d50889a42f999e1e9f440"
FINGERPRINT_FORMAT_TAGS = "f02ebc1a0574161080e1d11e640ba37e2033f2a3d53a7ced5502d38962f92570"
# The same with the sources appended: [DS, None, None, {}, ["part=a/x.json", "s3://bucket/b.json"]].
FINGERPRINT_WITH_FILES = "7d93de77318f9b6b08b761999669189cdd6d8081b823b1a544b4f4e29f2e8e4d"


def parse(files: Any, **extra: Any) -> BatchRequest:
    return parse_message(json.dumps({"datasetId": DS, "files": files, **extra}).encode(), "m1")


def reason(files: Any) -> str:
    with pytest.raises(InvalidMessage) as info:
        parse(files)
    return str(info.value)


def ref_reason(entry: Any) -> str:
    with pytest.raises(InvalidMessage) as info:
        file_ref(entry, "files[0]")
    return str(info.value)


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("x.json", "x.json"),
        ("part=a/x.json", "part=a/x.json"),
        ("exports/2026/part=a/part=b/x.csv", "exports/2026/part=a/part=b/x.csv"),
        ("s3://bucket/exports/part=a/x.parquet", "exports/part=a/x.parquet"),
        ("s3://bucket/x.parquet", "x.parquet"),
        ("gs://bucket/a/b.json", "a/b.json"),
        ("abfs://container@account.dfs.core.windows.net/a/b.csv", "a/b.csv"),
        ("file:///srv/x.json", "srv/x.json"),
        ("memory://bucket/data/x.json", "data/x.json"),
    ],
)
def test_a_file_keeps_its_path_as_its_name(source: str, name: str) -> None:
    assert file_ref(source) == FileRef(source=source, name=name)
    [ref] = parse([source]).files
    assert ref == FileRef(source=source, name=name)


@pytest.mark.parametrize(
    ("source", "url", "protocol"),
    [
        ("part=a/x.json", False, None),
        ("s3://bucket/x.json", True, "s3"),
        ("S3://bucket/x.json", True, "s3"),
        ("file:///srv/x.json", True, "file"),
    ],
)
def test_a_ref_knows_whether_it_is_a_url(source: str, url: bool, protocol: str | None) -> None:
    ref = file_ref(source)
    assert ref.url is url
    assert ref.protocol == protocol


def test_files_keep_their_order() -> None:
    sources = ["b.json", "s3://bucket/a.json", "part=a/c.json"]
    request = parse(sources)
    assert [ref.source for ref in request.files] == sources
    assert [ref.name for ref in request.files] == ["b.json", "a.json", "part=a/c.json"]


def test_a_thousand_files_are_accepted() -> None:
    request = parse([f"f{i}.json" for i in range(MAX_FILES)])
    assert len(request.files) == MAX_FILES == 1000


def test_a_name_of_exactly_the_limit_is_accepted() -> None:
    long = "d/" + "x" * (MAX_FILE_NAME - 2)
    assert file_ref(long).name == long
    assert len(file_ref("s3://bucket/" + long).name) == MAX_FILE_NAME == 1024


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("files", ["x.json", {"x": "y"}, 3, True])
def test_files_must_be_a_list(files: Any) -> None:
    assert "files must be a list" in reason(files)


def test_an_empty_list_is_refused() -> None:
    assert "files is empty" in reason([])


def test_more_than_a_thousand_files_are_refused() -> None:
    why = reason([f"f{i}" for i in range(MAX_FILES + 1)])
    assert "1001 entries" in why
    assert "1000" in why


@pytest.mark.parametrize(("entry", "kind"), [(3, "number"), (None, "null"), ({"path": "x"}, "object")])
def test_an_entry_that_is_not_a_string_is_refused(entry: Any, kind: str) -> None:
    assert reason(["ok.json", entry]) == f"files[1] must be a string, got {kind}"


@pytest.mark.parametrize("entry", ["/srv/x.json", "/x"])
def test_absolute_paths_are_refused(entry: str) -> None:
    assert "absolute paths are refused" in ref_reason(entry)


@pytest.mark.parametrize(
    "entry",
    [
        "..",
        "../x.json",
        "a/../../x.json",
        "a/..",
        ".",
        "./x.json",
        "a/./x.json",
        "a//x.json",
        "a/",
        "s3://bucket/../x.json",
        "s3://bucket//x.json",
        "s3://bucket/a/./x.json",
        "s3://bucket/a/",
        "file:////etc/passwd",
    ],
)
def test_dot_dot_dot_and_empty_segments_are_refused(entry: str) -> None:
    assert "'..' path segments are refused" in ref_reason(entry)


@pytest.mark.parametrize("entry", ["a\\x.json", "..\\x.json", "s3://bucket/a\\b.json"])
def test_backslashes_are_refused(entry: str) -> None:
    assert "backslashes" in ref_reason(entry)


@pytest.mark.parametrize("entry", ["", "a\x00.json", "a\nb.json", "a\tb", "x\x7f", "s3://b/a\rb", "a\u2028b"])
def test_empty_entries_and_control_characters_are_refused(entry: str) -> None:
    assert "without control characters" in ref_reason(entry)


@pytest.mark.parametrize(
    "entry", ["s3://bucket/x.json?versionId=3", "s3://bucket/x.json#frag", "https://host/a?b=c", "gs://b/?"]
)
def test_urls_with_a_query_or_fragment_are_refused(entry: str) -> None:
    assert "query or fragment" in ref_reason(entry)


@pytest.mark.parametrize("entry", ["s3://bucket", "s3://bucket/", "file://", "memory://"])
def test_urls_without_a_path_are_refused(entry: str) -> None:
    assert "the URL names no file" in ref_reason(entry)


@pytest.mark.parametrize(
    "files",
    [
        ["a/x.json", "a/x.json"],
        ["a/x.json", "s3://bucket/a/x.json"],
        ["s3://one/x.json", "gs://two/x.json"],
        ["file:///srv/x.json", "srv/x.json"],
    ],
)
def test_two_entries_with_the_same_name_are_refused(files: list[str]) -> None:
    why = reason(["first.json", *files])
    assert why.startswith("files[2]: the name")
    assert "given twice" in why


def test_names_over_the_limit_are_refused() -> None:
    too_long = "d/" + "x" * (MAX_FILE_NAME - 1)
    assert len(too_long) == 1025
    assert "over 1024 characters" in ref_reason(too_long)
    assert "over 1024 characters" in ref_reason("s3://bucket/" + too_long)
    assert "over 1024 characters" in reason([too_long])


def test_the_reason_names_the_entry() -> None:
    assert reason(["ok.json", "fine/x.json", "../etc/passwd"]).startswith("files[2]:")


# --- without files, and the fingerprint ---------------------------------------------------------


def test_a_message_without_files_has_none() -> None:
    plain = parse_message(json.dumps({"datasetId": DS}).encode(), "m1")
    assert plain.files == ()
    assert parse(None).files == ()
    assert parse_message(DS.encode(), "m1").files == ()


def test_without_files_the_fingerprint_is_the_one_from_before_files() -> None:
    plain = parse_message(json.dumps({"datasetId": DS}).encode(), "m1")
    assert plain.fingerprint == FINGERPRINT_BARE
    assert parse(None).fingerprint == FINGERPRINT_BARE
    shaped = parse_message(
        json.dumps(
            {
                "datasetId": DS,
                "inputFormat": {"format": "json", "isMultiLineJson": True},
                "tags": {"b": ["2"], "a": ["1"]},
            }
        ).encode(),
        "m1",
    )
    assert shaped.fingerprint == FINGERPRINT_FORMAT_TAGS


def test_with_files_the_fingerprint_includes_their_sources() -> None:
    request = parse(["part=a/x.json", "s3://bucket/b.json"])
    assert request.fingerprint == FINGERPRINT_WITH_FILES
    assert request.fingerprint != FINGERPRINT_BARE


def test_files_with_the_same_names_from_other_sources_are_another_request() -> None:
    local = parse(["a/x.json"])
    remote = parse(["s3://bucket/a/x.json"])
    assert [ref.name for ref in local.files] == [ref.name for ref in remote.files]
    assert local.fingerprint != remote.fingerprint
    assert parse(["a/x.json"]).fingerprint == local.fingerprint  # and it is stable
