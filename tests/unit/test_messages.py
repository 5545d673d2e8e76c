from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.messages import (
    DATASET_ID,
    MAX_MESSAGE_BYTES,
    MAX_TAGS,
    BatchRequest,
    InvalidMessage,
    external_id_for,
    message_object,
    parse_message,
)

DS = "5c8c3c555033b814b69f947f"


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def reason(raw: bytes, message_id: str = "m1") -> str:
    with pytest.raises(InvalidMessage) as info:
        parse_message(raw, message_id)
    return str(info.value)


def check(raw: bytes, message_id: str = "m1") -> BatchRequest | None:
    """The property: a valid request or InvalidMessage, nothing else; a valid one is usable."""
    why = ""
    try:
        request: BatchRequest | None = parse_message(raw, message_id)
    except InvalidMessage as exc:
        why, request = str(exc), None
    if request is None:
        assert why, "a rejection says why"
        return None
    assert isinstance(request, BatchRequest)
    assert DATASET_ID.fullmatch(request.dataset_id)
    assert 1 <= len(request.dataset_id) <= 128
    assert request.input_format in (None, "json", "parquet", "csv")
    assert request.multiline_json in (None, True, False)
    assert all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in request.tags.values())
    # Everything a valid request carries must survive the store, logs and the HTTP body (UTF-8).
    request.request_id.encode("utf-8")
    json.dumps(request.tags, ensure_ascii=False).encode("utf-8")
    assert request.external_id.startswith("orch-")
    assert request.fingerprint
    return request


# --- the documented shapes ---------------------------------------------------------------------------


def test_full_message() -> None:
    raw = body(
        {
            "datasetId": DS,
            "requestId": "crm-2026-11-28",
            "inputFormat": {"format": "parquet", "isMultiLineJson": False},
            "tags": {"source": ["crm"], "empty": []},
        }
    )
    request = parse_message(raw, "m1")
    assert request == BatchRequest(
        request_id="crm-2026-11-28",
        dataset_id=DS,
        input_format="parquet",
        multiline_json=False,
        tags={"source": ["crm"], "empty": []},
    )


def test_minimal_object_is_keyed_by_the_message_identity() -> None:
    request = parse_message(body({"datasetId": DS}), "abc-1")
    assert request.request_id == "msg:abc-1"
    assert request.dataset_id == DS
    assert (request.input_format, request.multiline_json, request.tags) == (None, None, {})


@pytest.mark.parametrize("raw", [DS.encode(), f"  {DS}\n".encode(), f"\t{DS}\r\n".encode()])
def test_bare_dataset_id(raw: bytes) -> None:
    request = parse_message(raw, "q-7")
    assert request == BatchRequest(request_id="msg:q-7", dataset_id=DS)


def test_json_string_dataset_id() -> None:
    assert parse_message(body(DS), "q-8") == BatchRequest(request_id="msg:q-8", dataset_id=DS)
    assert "datasetId must be 1 to 128" in reason(body("not an id!"))


def test_null_request_id_is_as_if_absent() -> None:
    assert parse_message(body({"datasetId": DS, "requestId": None}), "m9").request_id == "msg:m9"


def test_input_format_is_case_insensitive() -> None:
    request = parse_message(body({"datasetId": DS, "inputFormat": {"format": "CSV"}}), "m")
    assert request.input_format == "csv"


@pytest.mark.parametrize("dataset_id", ["a", "A" * 128, "a-b_c", "0abc", "ZZ9"])
def test_dataset_id_accepted(dataset_id: str) -> None:
    assert parse_message(body({"datasetId": dataset_id}), "m").dataset_id == dataset_id


def test_size_limit_is_inclusive() -> None:
    head = json.dumps({"datasetId": DS, "requestId": "r", "tags": {"pad": [""]}})
    pad = MAX_MESSAGE_BYTES - len(head)
    exact = head.replace('[""]', '["' + "x" * pad + '"]').encode()
    assert len(exact) == MAX_MESSAGE_BYTES
    assert parse_message(exact, "m").tags["pad"] == ["x" * pad]
    over = exact.replace(b'"r"', b'"rr"')
    assert len(over) == MAX_MESSAGE_BYTES + 1
    assert "over the 65536 byte limit" in reason(over)
    assert "over the 65536 byte limit" in reason(DS.encode() + b" " * MAX_MESSAGE_BYTES)


def test_tags_key_limit() -> None:
    tags = {f"k{i}": ["v"] for i in range(MAX_TAGS)}
    assert len(parse_message(body({"datasetId": DS, "tags": tags}), "m").tags) == MAX_TAGS
    tags["one-more"] = ["v"]
    assert "over the limit of 64" in reason(body({"datasetId": DS, "tags": tags}))


# --- invalid messages, each with a reason a person can act on -----------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "empty"),
        (b"  \n\t ", "empty"),
        (b"\xff\xfe" + DS.encode(), "not UTF-8"),
        (b"{not json", "not JSON and not a dataset id"),
        (b"bad id with spaces", "not JSON and not a dataset id"),
        (b"-1", "got number"),
        (b"1.5e3", "got number"),
        (b"[1, 2]", "got array"),
        (b"[null]", "got array"),
        (b'"a b"', "datasetId must be"),
        (body({}), "datasetId is missing"),
        (body({"datasetid": DS}), "datasetId is missing"),
        (body({"datasetId": None}), "datasetId must be a string, got null"),
        (body({"datasetId": 5}), "datasetId must be a string, got number"),
        (body({"datasetId": [DS]}), "datasetId must be a string, got array"),
        (body({"datasetId": ""}), "datasetId must be 1 to 128"),
        (body({"datasetId": "A" * 129}), "datasetId must be 1 to 128"),
        (body({"datasetId": "-leading"}), "datasetId must be 1 to 128"),
        (body({"datasetId": "a/b"}), "datasetId must be 1 to 128"),
        (body({"datasetId": "a&x=1"}), "datasetId must be 1 to 128"),
        (body({"datasetId": "é"}), "datasetId must be 1 to 128"),
        (body({"datasetId": DS, "requestId": 7}), "requestId must be a string, got number"),
        (body({"datasetId": DS, "requestId": {"a": 1}}), "requestId must be a string, got object"),
        (body({"datasetId": DS, "requestId": ""}), "requestId must be 1 to 256"),
        (body({"datasetId": DS, "requestId": "x" * 257}), "requestId must be 1 to 256"),
        (body({"datasetId": DS, "requestId": "a\nb"}), "requestId must be 1 to 256"),
        (body({"datasetId": DS, "requestId": "a\x7fb"}), "requestId must be 1 to 256"),
        (body({"datasetId": DS, "inputFormat": "json"}), "inputFormat must be an object, got string"),
        (body({"datasetId": DS, "inputFormat": {}}), "inputFormat.format must be a string"),
        (body({"datasetId": DS, "inputFormat": {"format": 1}}), "inputFormat.format must be a string"),
        (body({"datasetId": DS, "inputFormat": {"format": "xml"}}), "must be one of json, parquet, csv"),
        (
            body({"datasetId": DS, "inputFormat": {"format": "json", "isMultiLineJson": "yes"}}),
            "isMultiLineJson must be a boolean, got string",
        ),
        (body({"datasetId": DS, "tags": ["a"]}), "tags must be an object"),
        (body({"datasetId": DS, "tags": {"source": "crm"}}), "tags.source must be a list of strings"),
        (body({"datasetId": DS, "tags": {"source": [1]}}), "tags.source must be a list of strings"),
    ],
)
def test_invalid(raw: bytes, expected: str) -> None:
    assert expected in reason(raw)


# --- bare tokens: a dataset id, or a JSON value that is neither an object nor a string ----------------


@pytest.mark.parametrize("token", ["12345", "1e5", "0", "007", "NULL", "True", "nullx", "infinity"])
def test_a_bare_token_of_the_dataset_id_pattern_is_that_dataset_id(token: str) -> None:
    # All-digit ids are valid dataset ids, so `12345` is the dataset "12345", not the JSON number.
    assert parse_message(token.encode(), "m") == BatchRequest(request_id="msg:m", dataset_id=token)
    assert parse_message(f" {token}\r\n".encode(), "m").dataset_id == token
    assert message_object(token.encode()) == {"datasetId": token}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"null", "null"),
        (b"true", "boolean"),
        (b"false", "boolean"),
        (b" null\n", "null"),
        (b"[1]", "array"),
        (b"-5", "number"),
        (b"1.5", "number"),
    ],
)
def test_a_json_value_that_is_neither_an_object_nor_a_string_is_rejected(raw: bytes, kind: str) -> None:
    # `null`, `true` and `false` match the dataset id pattern, but they are what a producer sends when it
    # serialises a missing value: a JSON value, not an id.
    assert reason(raw) == f"expected a JSON object or a dataset id, got {kind}"
    with pytest.raises(InvalidMessage):
        message_object(raw)


@pytest.mark.parametrize("value", ["12345", "null", DS])
def test_a_json_string_is_a_dataset_id(value: str) -> None:
    assert parse_message(body(value), "m") == BatchRequest(request_id="msg:m", dataset_id=value)


@given(st.text(max_size=60))
def test_message_object_is_what_parse_message_reads(text: str) -> None:
    """`enqueue` builds its message from `message_object`; intake reads the same body with
    `parse_message`. They must agree on which bodies are messages and on the dataset id."""
    raw = text.encode("utf-8")
    try:
        message = message_object(raw)
    except InvalidMessage:
        with pytest.raises(InvalidMessage):
            parse_message(raw, "m")
        return
    assert isinstance(message, dict)
    request = check(raw)
    if request is not None:
        assert request.dataset_id == message["datasetId"]
        assert check(json.dumps(message).encode()) == request


def test_deeply_nested_json_is_rejected_not_a_crash() -> None:
    # Within the size limit, but deeper than the JSON decoder's recursion limit.
    assert "nested" in reason(b"[" * 50_000)
    assert "nested" in reason(b'{"datasetId": "ab", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")


@pytest.mark.parametrize(
    "value",
    [
        {"datasetId": DS, "requestId": "\ud800"},
        {"datasetId": DS, "requestId": "ok", "tags": {"k\udfff": ["v"]}},
        {"datasetId": DS, "requestId": "ok", "tags": {"k": ["v\udc00"]}},
    ],
)
def test_lone_surrogate_escapes_are_rejected(value: dict[str, Any]) -> None:
    # `\ud800` is valid JSON syntax, but no Unicode text: it cannot be stored, logged or sent as UTF-8.
    raw = json.dumps(value).encode()  # ensure_ascii: the surrogate travels as an escape
    assert "surrogate" in reason(raw)


def test_a_rejection_never_echoes_control_characters() -> None:
    # Reasons end up in the store (PostgreSQL text cannot hold NUL) and in log lines.
    text = reason(body({"datasetId": DS, "tags": {"bad\x00key\n": "x"}}))
    assert all(ch.isprintable() for ch in text), text


# --- request identity ----------------------------------------------------------------------------------


def test_request_id_is_the_key_across_deliveries() -> None:
    raw = body({"datasetId": DS, "requestId": "r-1"})
    first, second = parse_message(raw, "m1"), parse_message(raw, "m2")
    assert first == second
    assert first.external_id == second.external_id == external_id_for("r-1")
    assert first.fingerprint == second.fingerprint


def test_without_request_id_each_message_is_its_own_request() -> None:
    first, second = parse_message(DS.encode(), "m1"), parse_message(DS.encode(), "m2")
    assert first.request_id != second.request_id
    assert first.external_id != second.external_id
    # The same message redelivered keeps its identity.
    assert parse_message(DS.encode(), "m1").external_id == first.external_id


def test_fingerprint_tells_different_requests_apart() -> None:
    base = {"datasetId": DS, "requestId": "r"}
    variants = [
        base,
        {**base, "datasetId": DS + "x"},
        {**base, "inputFormat": {"format": "csv"}},
        {**base, "inputFormat": {"format": "json", "isMultiLineJson": True}},
        {**base, "tags": {"a": ["b"]}},
    ]
    prints = {parse_message(body(v), "m").fingerprint for v in variants}
    assert len(prints) == len(variants)
    # Key order in the message does not matter.
    swapped = {"tags": {"y": ["2"], "x": ["1"]}, "requestId": "r", "datasetId": DS}
    ordered = {"datasetId": DS, "requestId": "r", "tags": {"x": ["1"], "y": ["2"]}}
    assert parse_message(body(swapped), "a").fingerprint == parse_message(body(ordered), "b").fingerprint


def test_external_id_shape() -> None:
    value = external_id_for("crm-2026-11-28")
    assert value == external_id_for("crm-2026-11-28")
    assert value.startswith("orch-")
    assert len(value) == 45
    assert all(c in "0123456789abcdef" for c in value[5:])


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_external_id_deterministic_and_distinct(a: str, b: str) -> None:
    assert external_id_for(a) == external_id_for(a)
    assert (external_id_for(a) == external_id_for(b)) == (a == b)


# --- properties over malformed input ----------------------------------------------------------------

# Any code point, lone surrogates and control characters included (JSON escapes carry them).
CHARS = st.characters() | st.characters(categories=["Cs"])
ANY_TEXT = st.text(CHARS, max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=300),
    st.lists(JSON_VALUES, max_size=3),
    st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3),
)
FIELDS = {
    "datasetId": st.one_of(st.from_regex(DATASET_ID, fullmatch=True), WRONG),
    "requestId": st.one_of(st.text(CHARS, min_size=1, max_size=300), WRONG),
    "inputFormat": st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "format": st.one_of(st.sampled_from(["json", "PARQUET", "csv", "xml"]), WRONG),
                "isMultiLineJson": st.one_of(st.booleans(), WRONG),
            },
        ),
        WRONG,
    ),
    "tags": st.one_of(st.dictionaries(ANY_TEXT, st.lists(ANY_TEXT, max_size=3)), WRONG),
}
MESSAGES = st.fixed_dictionaries({}, optional=FIELDS)


@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw: bytes) -> None:
    check(raw)


@given(JSON_VALUES)
def test_arbitrary_json(value: Any) -> None:
    check(json.dumps(value).encode())


@given(st.text(CHARS, min_size=1, max_size=40), st.dictionaries(ANY_TEXT, st.lists(ANY_TEXT, max_size=2)))
def test_any_request_id_and_tags(request_id: str, tags: dict[str, list[str]]) -> None:
    check(json.dumps({"datasetId": DS, "requestId": request_id, "tags": tags}).encode())


@given(MESSAGES, st.text(min_size=1, max_size=20))
def test_messages_with_wrong_types(value: dict[str, Any], message_id: str) -> None:
    request = check(json.dumps(value).encode(), message_id)
    if request is not None:
        assert request.dataset_id == value["datasetId"]
        expected = value.get("requestId")
        assert request.request_id == (f"msg:{message_id}" if expected is None else expected)


@given(st.sampled_from(sorted(FIELDS)), WRONG)
def test_each_field_with_a_wrong_type(name: str, wrong: Any) -> None:
    value: dict[str, Any] = {"datasetId": DS, "requestId": "r", "inputFormat": {"format": "json"}}
    value[name] = wrong
    request = check(json.dumps(value).encode())
    if request is None:
        return
    # Only a value that happens to be valid gets through (null is "absent" for the optional ones).
    if name == "datasetId":
        assert request.dataset_id == wrong
    elif name == "requestId":
        assert request.request_id == ("msg:m1" if wrong is None else wrong)
    elif name == "inputFormat":
        assert wrong is None or isinstance(wrong, dict)
    else:
        assert wrong is None or isinstance(wrong, dict)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(1, 4096), st.sampled_from([b" ", b"a", b"\xff", b"["]))
def test_oversize_bodies(extra: int, filler: bytes) -> None:
    raw = body({"datasetId": DS, "tags": {"pad": ["x"]}})
    raw = raw + filler * (MAX_MESSAGE_BYTES - len(raw) + extra)
    assert len(raw) > MAX_MESSAGE_BYTES
    assert "byte limit" in reason(raw)


@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    raw = text.encode("utf-8")
    request = check(raw)
    if request is not None and DATASET_ID.fullmatch(text.strip()):
        assert request.dataset_id == text.strip()
