"""QMP input framing without sockets: message boundaries, QEMU's error texts, limits and recovery."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylog.control.json_stream import JsonError, JsonStreamer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=5),
       st.lists(st.integers(1, 64), max_size=30))
def test_any_split_of_a_stream_of_objects_yields_the_same_objects(messages: list[dict[str, object]],
                                                                   cuts: list[int]) -> None:
    data = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    streamer = JsonStreamer()
    out: list[object] = []
    position = 0
    for cut in cuts:
        out += streamer.feed(data[position:position + cut])
        position += cut
    out += streamer.feed(data[position:])
    assert out == messages


def test_messages_need_no_separator_and_objects_span_reads() -> None:
    streamer = JsonStreamer()
    assert streamer.feed(b'{"execute":"stop"}{"execute":') == [{"execute": "stop"}]
    assert streamer.feed(b' "cont"}  [1, 2]') == [{"execute": "cont"}, [1, 2]]


def test_qemu_extensions_single_quotes_and_escaped_apostrophe() -> None:
    streamer = JsonStreamer()
    assert streamer.feed(b"{'execute': 'it\\'s', \"id\": 'a\"b'}") == [{"execute": "it's", "id": 'a"b'}]


def test_numbers_are_int64_or_uint64_else_float_as_qemu_qnum() -> None:
    out = JsonStreamer().feed(b"[-9223372036854775808, 18446744073709551615, 18446744073709551616, 1.5e3, -0]")
    assert out == [[-(2**63), 2**64 - 1, float(2**64), 1500.0, 0]]
    assert isinstance(out[0][2], float)


@pytest.mark.parametrize(("text", "message"), [
    (b'{ "execute": }', "JSON parse error, expecting value"),
    (b'{"a" 1}', "JSON parse error, missing : in object pair"),
    (b'{"a": 1 "b": 2}', "JSON parse error, expected separator in dict"),
    (b"[1 2]", "JSON parse error, expected separator in list"),
    (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key"),
    (b"{1: 2}", "JSON parse error, key is not a string in object"),
    (b"[tru]", "JSON parse error, invalid keyword 'tru'"),
    (b'["\\x"]', "JSON parse error, invalid escape sequence in string"),
    (b'["\\ud800"]', "JSON parse error, \\ud800 is not a valid Unicode character"),
    (b'["\xc3\x28"]', "JSON parse error, invalid UTF-8 sequence in string"),
    (b"}", "JSON parse error, expecting value"),
])
def test_syntax_errors_in_qemus_words(text: bytes, message: str) -> None:
    assert JsonStreamer().feed(text) == [JsonError(message)]


def test_a_lexical_error_names_the_stray_token_and_recovery_resumes_at_the_next_structure() -> None:
    streamer = JsonStreamer()
    # '@' cannot start a token: reported, then everything up to a structural character is skipped; the '}'
    # that ends the broken message is then a message of its own (QEMU answers it too).
    out = streamer.feed(b'{"execute": @oops}\n{"execute": "cont"}')
    assert out == [JsonError("JSON parse error, stray '@'"), JsonError("JSON parse error, expecting value"),
                   {"execute": "cont"}]


def test_a_control_character_forces_a_known_good_state_as_the_spec_says() -> None:
    streamer = JsonStreamer()
    assert streamer.feed(b'{"execute": "stop", "arguments": {') == []
    out = streamer.feed(b'\x01{"execute": "cont"}')
    assert out == [JsonError("JSON parse error, stray '\x01'"), {"execute": "cont"}]


def test_a_message_over_the_size_limit_is_refused_and_the_next_one_works() -> None:
    streamer = JsonStreamer(max_bytes=1000)
    big = b'{"execute": "x", "arguments": {"y": "' + b"A" * 5000 + b'"}}\n{"execute": "cont"}'
    out = streamer.feed(big)
    assert out[0] == JsonError("JSON token size limit exceeded")
    assert out[-1] == {"execute": "cont"}
    assert streamer.pending == 0


def test_the_size_limit_bounds_memory_while_an_endless_string_arrives() -> None:
    streamer = JsonStreamer(max_bytes=10_000)
    streamer.feed(b'{"execute": "x", "arguments": {"y": "')
    errors = []
    for _ in range(100):
        errors += streamer.feed(b"a" * 1000)
        assert streamer.pending <= 10_001
    assert JsonError("JSON token size limit exceeded") in errors


def test_nesting_and_token_count_limits() -> None:
    assert JsonStreamer(max_depth=3).feed(b"[[[[1]]]]")[0] == JsonError("JSON nesting depth limit exceeded")
    (deepest,) = JsonStreamer().feed(b"[" * 1024 + b"]" * 1024)  # QEMU's limit, reached without recursion
    assert _depth(deepest) == 1024
    assert JsonStreamer().feed(b"[" * 1025 + b"]" * 1025)[0] == JsonError("JSON nesting depth limit exceeded")
    assert JsonStreamer(max_tokens=10).feed(b"[1,2,3,4,5,6]")[0] == JsonError("JSON token count limit exceeded")


def _depth(value: object) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth
