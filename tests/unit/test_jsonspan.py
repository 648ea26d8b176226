"""Editing one JSON value in place: every other character stays as it was."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.messages.jsonspan import integer_at, parse_with_spans, remove_member, replace_value, value_span
from proxy.demo.peers import OCMF_SAMPLE

METER = ('[2,"m1","MeterValues",{"connectorId":1,"transactionId":1001,"meterValue":[{"timestamp":'
         '"2026-11-25T10:00:00Z","sampledValue":[{"value":' + json.dumps(OCMF_SAMPLE, ensure_ascii=False)
         + ',"format":"SignedData"}]}]}]')


def test_finds_and_replaces_only_the_number() -> None:
    assert integer_at(METER, (3, "transactionId")) == 1001
    edited = replace_value(METER, (3, "transactionId"), "7")
    assert edited == METER.replace('"transactionId":1001', '"transactionId":7')
    assert integer_at(METER, (3, "connectorId")) == 1
    assert integer_at(METER, (3, "meterValue", 0, "timestamp")) is None  # a string, not an integer
    assert value_span(METER, (3, "missing")) is None


def test_odd_spacing_escapes_and_nesting() -> None:
    text = ' [ 2 ,"x" , "SetChargingProfile" , {"conn\\u0065ctorId" : 1 ,\n "csChargingProfiles":' \
           '{"a":"}]\\"{[","transactionId" :\t42 } } ] '
    assert integer_at(text, (3, "csChargingProfiles", "transactionId")) == 42
    assert integer_at(text, (3, "connectorId")) == 1  # keys are compared decoded
    assert replace_value(text, (3, "csChargingProfiles", "transactionId"), "9") == text.replace("42", "9")


def test_not_integers_and_broken_text_give_none() -> None:
    assert integer_at('[2,"x","MeterValues",{"transactionId":1001.0}]', (3, "transactionId")) is None
    assert integer_at('[2,"x","MeterValues",{"transactionId":"1001"}]', (3, "transactionId")) is None
    assert integer_at('[2,"x","MeterValues",{"transactionId":1001', (3, "transactionId")) is None
    assert integer_at('[2,"x","MeterValues",{"transactionId" 1001}]', (3, "transactionId")) is None
    assert integer_at('not json', (3, "transactionId")) is None
    assert value_span('[1,2]', (5,)) is None


def test_duplicate_keys_use_the_last_like_json_loads() -> None:
    text = '[2,"x","MeterValues",{"transactionId":1,"transactionId":2}]'
    assert integer_at(text, (3, "transactionId")) == json.loads(text)[3]["transactionId"] == 2


def test_remove_member_first_middle_last_only() -> None:
    path = (3, "transactionId")
    assert remove_member('[2,"x","M",{"transactionId":5,"a":1}]', path) == '[2,"x","M",{"a":1}]'
    assert remove_member('[2,"x","M",{"a":1, "transactionId" : 5 ,"b":2}]', path) == '[2,"x","M",{"a":1, "b":2}]'
    assert remove_member('[2,"x","M",{"a":1,"transactionId":5}]', path) == '[2,"x","M",{"a":1}]'
    assert remove_member('[2,"x","M",{ "transactionId":5 }]', path) == '[2,"x","M",{  }]'
    assert remove_member('[2,"x","M",{"a":1}]', path) is None
    assert remove_member(METER, path) == METER.replace('"transactionId":1001,', "")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                         st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)


@given(payload=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "transactionId"), json_values,
                               max_size=6),
       position=st.integers(min_value=0, max_value=6), tx=st.integers(min_value=0, max_value=2**31),
       new=st.integers(min_value=0, max_value=2**31), ascii_only=st.booleans(),
       separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
def test_replace_and_remove_are_surgical(payload: dict[str, Any], position: int, tx: int, new: int,
                                        ascii_only: bool, separators: tuple[str, str]) -> None:
    items = list(payload.items())
    items.insert(min(position, len(items)), ("transactionId", tx))
    text = json.dumps([2, "id", "MeterValues", dict(items)], ensure_ascii=ascii_only, separators=separators)
    path = (3, "transactionId")
    assert integer_at(text, path) == tx
    span = value_span(text, path)
    assert span is not None
    edited = replace_value(text, path, str(new))
    assert edited is not None
    # Only the number changed: the text around it is the original text.
    assert edited[:span[0]] == text[:span[0]] and edited[span[0] + len(str(new)):] == text[span[1]:]
    assert json.loads(edited)[3] == {**dict(items), "transactionId": new}
    removed = remove_member(text, path)
    assert removed is not None and json.loads(removed)[3] == payload


# --- parse_with_spans: json.loads plus the spans of the values a pattern names -----------------------

def _at(value: Any, path: tuple[int | str, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@given(payload=json_values, ascii_only=st.booleans(),
       separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
def test_parse_with_spans_is_json_loads_and_each_span_is_its_value(payload: Any, ascii_only: bool,
                                                                   separators: tuple[str, str]) -> None:
    text = " " + json.dumps([2, "id", "MeterValues", {"meterValue": [{"sampledValue": [payload, {"a": payload}]},
                                                                      payload]}],
                            ensure_ascii=ascii_only, separators=separators) + "\n"
    parsed, spans = parse_with_spans(text, (3, "meterValue", None, "sampledValue", None))
    assert parsed == json.loads(text)
    assert list(spans) == [(3, "meterValue", 0, "sampledValue", 0), (3, "meterValue", 0, "sampledValue", 1)]
    for path, (start, end) in spans.items():
        assert json.loads(text[start:end]) == _at(parsed, path)  # the exact text of that value, nothing around it
        assert text[start] in '[{"-0123456789tfn' and not text[end - 1].isspace()


def test_parse_with_spans_keeps_the_bytes_and_refuses_what_is_not_json() -> None:
    parsed, spans = parse_with_spans(METER, (3, "meterValue", None, "sampledValue", None))
    [(start, end)] = spans.values()
    assert METER[start:end] == '{"value":' + json.dumps(OCMF_SAMPLE, ensure_ascii=False) + ',"format":"SignedData"}'
    dup = '[2,"x","M",{"k":[{"v":1},{"v":3}],"k":[{"v":2}]}]'  # the later duplicate key wins, as in json.loads
    parsed, spans = parse_with_spans(dup, (3, "k", None))
    assert parsed == json.loads(dup) and [dup[s:e] for s, e in spans.values()] == ['{"v":2}']
    for bad in ('[2,"x","M",{"k":[1,]}]', '[2,"x"', '[2,"x"] tail', '{"a" 1}', "", "[1 2]"):
        with pytest.raises(ValueError):
            parse_with_spans(bad, (3, "k", None))
