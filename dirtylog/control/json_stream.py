"""QMP's input framing as QEMU does it: a byte lexer, a message streamer and a JSON parser, with no I/O.

QMP input is a stream of JSON values with nothing between them: no length, no newline rule. QEMU finds
message boundaries by lexing tokens and counting braces and brackets (``qobject/json-lexer.c``,
``json-streamer.c``, ``json-parser.c``), and clients rely on how it recovers from bad input, so this module
follows it rule for rule:

* **Lexer.** A table-driven automaton over bytes. Strings may be double- or single-quoted (QEMU's
  extension); keywords are ``[a-z]+`` (the parser rejects unknown ones); numbers follow RFC 8259. A byte
  that fits no token is a lexical error: the bad token is reported ("JSON parse error, stray '...'") and
  the lexer skips input until a structural character, a control character other than tab, or the
  impossible UTF-8 bytes 0xFE/0xFF — which is how a client forces a known-good state (qmp-spec.rst).
* **Streamer.** Tokens accumulate until braces and brackets balance, or a closer has no opener; then the
  tokens are parsed as one message. Per message at most ``max_bytes`` of token text (QEMU: 64 MiB),
  ``max_tokens`` tokens (2 Mi) and ``max_depth`` nesting (1024); crossing one reports "JSON token size
  limit exceeded" (or count, or nesting depth) and drops what was gathered.
* **Parser.** The tokens of one message become a value or the first error, in QEMU's words
  ("JSON parse error, expecting value", "... missing : in object pair", ...). Integers are kept when
  they fit int64 or uint64, else become floats, as QEMU's QNum does.

Hot loops are regular expressions over whole runs of bytes (string bodies, digits, whitespace, bytes
skipped in recovery), so a 64 MiB message is lexed at C speed; only token boundaries cost Python steps.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Final

MAX_MESSAGE_BYTES: Final = 64 << 20  # QEMU's MAX_TOKEN_SIZE: token text per message
MAX_TOKENS: Final = 2 << 20  # QEMU's MAX_TOKEN_COUNT
MAX_DEPTH: Final = 1 << 10  # QEMU's MAX_NESTING
PARSE_MESSAGE_BYTES: Final = 1024  # QEMU's parse_error() buffer

JsonValue = Any  # dict | list | str | int | float | bool | None, as json.loads returns


class Token(enum.IntEnum):
    """Token types, and the lexer's inner states after them (kept apart: a state is never emitted)."""

    ERROR = 0
    LCURLY = 1
    RCURLY = 2
    LSQUARE = 3
    RSQUARE = 4
    COLON = 5
    COMMA = 6
    INTEGER = 7
    FLOAT = 8
    KEYWORD = 9
    STRING = 10
    OVERSIZED = 11  # a single token longer than the message limit, cut off by the lexer
    # lexer states
    START = 20
    RECOVERY = 21
    DQ = 22
    DQ_ESC = 23
    SQ = 24
    SQ_ESC = 25
    ZERO = 26
    EXP_DIGITS = 27
    EXP_SIGN = 28
    EXP_E = 29
    MANTISSA = 30
    MANTISSA_DIGITS = 31
    DIGITS = 32
    SIGN = 33
    KEYWORD_CHARS = 34


_FIRST_STATE = Token.START
_LOOKAHEAD = 0x100  # the transition does not consume the byte


def _table() -> dict[Token, list[int]]:
    """QEMU's json_lexer[][] transition table: state -> next state (or token) for each byte."""
    t: dict[Token, list[int]] = {}

    def row(default: int) -> list[int]:
        return [default] * 256

    def put(r: list[int], chars: bytes | range, value: int) -> None:
        for c in chars:
            r[c] = value

    digits = b"0123456789"
    r = row(Token.ERROR)
    put(r, b'"', Token.DQ)
    put(r, b"'", Token.SQ)
    put(r, b"0", Token.ZERO)
    put(r, b"123456789", Token.DIGITS)
    put(r, b"-", Token.SIGN)
    for char, token in ((b"{", Token.LCURLY), (b"}", Token.RCURLY), (b"[", Token.LSQUARE), (b"]", Token.RSQUARE),
                        (b",", Token.COMMA), (b":", Token.COLON)):
        put(r, char, token)
    put(r, range(ord("a"), ord("z") + 1), Token.KEYWORD_CHARS)
    put(r, b" \t\r\n", Token.START)
    t[Token.START] = r

    r = row(Token.RECOVERY)
    put(r, range(0x00, 0x20), Token.START | _LOOKAHEAD)
    put(r, range(0xFE, 0x100), Token.START | _LOOKAHEAD)
    put(r, b"\t", Token.RECOVERY)
    put(r, b"[]{}:,", Token.START | _LOOKAHEAD)
    t[Token.RECOVERY] = r

    for body, escape, quote in ((Token.DQ, Token.DQ_ESC, b'"'), (Token.SQ, Token.SQ_ESC, b"'")):
        r = row(Token.ERROR)
        put(r, range(0x20, 0xFE), body)
        t[escape] = r
        r = row(Token.ERROR)
        put(r, range(0x20, 0xFE), body)
        put(r, b"\\", escape)
        put(r, quote, Token.STRING)
        t[body] = r

    r = row(Token.INTEGER | _LOOKAHEAD)
    put(r, digits, Token.ERROR)
    put(r, b".", Token.MANTISSA)
    t[Token.ZERO] = r
    r = row(Token.FLOAT | _LOOKAHEAD)
    put(r, digits, Token.EXP_DIGITS)
    t[Token.EXP_DIGITS] = r
    r = row(Token.ERROR)
    put(r, digits, Token.EXP_DIGITS)
    t[Token.EXP_SIGN] = r
    r = row(Token.ERROR)
    put(r, b"-+", Token.EXP_SIGN)
    put(r, digits, Token.EXP_DIGITS)
    t[Token.EXP_E] = r
    r = row(Token.FLOAT | _LOOKAHEAD)
    put(r, digits, Token.MANTISSA_DIGITS)
    put(r, b"eE", Token.EXP_E)
    t[Token.MANTISSA_DIGITS] = r
    r = row(Token.ERROR)
    put(r, digits, Token.MANTISSA_DIGITS)
    t[Token.MANTISSA] = r
    r = row(Token.INTEGER | _LOOKAHEAD)
    put(r, digits, Token.DIGITS)
    put(r, b"eE", Token.EXP_E)
    put(r, b".", Token.MANTISSA)
    t[Token.DIGITS] = r
    r = row(Token.ERROR)
    put(r, b"0", Token.ZERO)
    put(r, b"123456789", Token.DIGITS)
    t[Token.SIGN] = r
    r = row(Token.KEYWORD | _LOOKAHEAD)
    put(r, range(ord("a"), ord("z") + 1), Token.KEYWORD_CHARS)
    t[Token.KEYWORD_CHARS] = r
    return t


_TABLE: Final = _table()

# Runs a state loops on, skipped with one regex call instead of one table step per byte.
_RUNS: Final = {
    Token.START: re.compile(rb"[ \t\r\n]+"),
    Token.RECOVERY: re.compile(rb"[\x09\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+"),
    Token.DQ: re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]+"),
    Token.SQ: re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"),
    Token.DIGITS: re.compile(rb"[0-9]+"),
    Token.MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    Token.EXP_DIGITS: re.compile(rb"[0-9]+"),
    Token.KEYWORD_CHARS: re.compile(rb"[a-z]+"),
}
_KEEPS_TEXT: Final = frozenset(_RUNS) - {Token.START, Token.RECOVERY}


@dataclass(frozen=True)
class JsonError:
    """Input that did not make a JSON value; ``message`` is QEMU's error description."""

    message: str


class _Lexer:
    """Bytes in, ``(type, text)`` tokens out, as QEMU's json-lexer.c."""

    def __init__(self, max_token: int) -> None:
        self.state: Token = _FIRST_STATE
        self.token = bytearray()
        self.max_token = max_token

    def feed(self, data: bytes, emit: list[tuple[Token, bytes]]) -> None:
        view = memoryview(data)
        i, end = 0, len(data)
        table, runs = _TABLE, _RUNS
        while i < end:
            state = self.state
            run = runs.get(state)
            if run is not None:
                match = run.match(data, i)
                if match is not None:
                    stop = match.end()
                    if state in _KEEPS_TEXT:
                        room = self.max_token + 1 - len(self.token)
                        if stop - i >= room:  # the token outgrows the limit inside this run
                            self.token += view[i:i + room]
                            i += room
                            self._cut_oversized(emit)
                            continue
                        self.token += view[i:stop]
                    i = stop
                    if i == end:
                        break
            byte = data[i]
            step = table[state][byte]
            consumed = not step & _LOOKAHEAD
            step &= ~_LOOKAHEAD
            if consumed:
                self.token.append(byte)
                i += 1
            if step < Token.START:  # a token, or an error
                emit.append((Token(step), bytes(self.token)))
                self.token.clear()
                self.state = Token.RECOVERY if step == Token.ERROR else Token.START
            else:
                if step in (Token.START, Token.RECOVERY):
                    self.token.clear()
                self.state = Token(step)
                if len(self.token) > self.max_token:
                    self._cut_oversized(emit)

    def _cut_oversized(self, emit: list[tuple[Token, bytes]]) -> None:
        """QEMU hands an overlong token to the streamer as it is (which rejects it) and starts afresh."""
        emit.append((Token.OVERSIZED, bytes(self.token)))
        self.token.clear()
        self.state = Token.START


class JsonStreamer:
    """Bytes in, complete JSON values (or :class:`JsonError`) out: QMP's input side, without I/O.

    ``feed(data)`` returns every message completed by ``data``, in order; partial input waits for more.
    """

    def __init__(self, *, max_bytes: int = MAX_MESSAGE_BYTES, max_tokens: int = MAX_TOKENS,
                 max_depth: int = MAX_DEPTH) -> None:
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
        self.max_depth = max_depth
        self._lexer = _Lexer(max_bytes)
        self._tokens: list[tuple[Token, bytes]] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    @property
    def pending(self) -> int:
        """Bytes of token text held for an unfinished message (bounded by ``max_bytes``)."""
        return self._size + len(self._lexer.token)

    def feed(self, data: bytes) -> list[JsonValue | JsonError]:
        tokens: list[tuple[Token, bytes]] = []
        self._lexer.feed(data, tokens)
        out: list[JsonValue | JsonError] = []
        for kind, text in tokens:
            message = self._token(kind, text)
            if message is not _MORE:
                out.append(message)
        return out

    def _token(self, kind: Token, text: bytes) -> object:
        if kind == Token.LCURLY:
            self._braces += 1
        elif kind == Token.RCURLY:
            self._braces -= 1
        elif kind == Token.LSQUARE:
            self._brackets += 1
        elif kind == Token.RSQUARE:
            self._brackets -= 1
        elif kind == Token.ERROR:
            return self._reset(JsonError(f"JSON parse error, stray '{_show(text)}'"))
        if self._size + len(text) + 1 > self.max_bytes:
            return self._reset(JsonError("JSON token size limit exceeded"))
        if len(self._tokens) + 1 > self.max_tokens:
            return self._reset(JsonError("JSON token count limit exceeded"))
        if self._brackets + self._braces > self.max_depth:
            return self._reset(JsonError("JSON nesting depth limit exceeded"))
        self._tokens.append((kind, text))
        self._size += len(text)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return _MORE
        tokens = self._tokens
        self._tokens = []
        try:
            value: JsonValue | JsonError = _Parser(tokens).parse()
        except _ParseError as error:
            # QEMU formats the parser's message into a 1024-byte buffer: longer ones are cut.
            message = str(error).encode()[:PARSE_MESSAGE_BYTES - 1].decode(errors="replace")
            value = JsonError(f"JSON parse error, {message}")
        return self._reset(value)

    def _reset(self, message: JsonValue | JsonError) -> JsonValue | JsonError:
        self._tokens = []
        self._size = self._braces = self._brackets = 0
        return message


_MORE: Final = object()


def _show(text: bytes) -> str:
    return text.decode("utf-8", errors="replace")


class _ParseError(Exception):
    """The first error in a message (QEMU keeps only the first)."""


_VALUE_STARTS: Final = frozenset({Token.LCURLY, Token.LSQUARE, Token.INTEGER, Token.FLOAT, Token.STRING,
                                  Token.KEYWORD})
_ESCAPE: Final = re.compile(rb"\\(u[0-9A-Fa-f]{4}|u.{0,4}|.)", re.DOTALL)
_SIMPLE_ESCAPES: Final = {b'"': '"', b"'": "'", b"\\": "\\", b"/": "/", b"b": "\b", b"f": "\f", b"n": "\n",
                          b"r": "\r", b"t": "\t"}
_INT64_MIN: Final = -(1 << 63)
_UINT64_END: Final = 1 << 64


class _Parser:
    """One message's tokens to a value, iteratively (messages nest up to 1024 deep), with QEMU's errors."""

    def __init__(self, tokens: list[tuple[Token, bytes]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def pop(self) -> tuple[Token, bytes]:
        if self.pos >= len(self.tokens):
            raise _ParseError("premature EOI")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def parse(self) -> JsonValue:
        # Each frame: [container, key of the pending member or None]; the stack holds open containers.
        stack: list[list[Any]] = []
        value = self._start_value(stack)
        while True:
            if value is _OPENED:
                value = self._first_member(stack)
                continue
            if not stack:
                return value
            frame = stack[-1]
            container = frame[0]
            if isinstance(container, list):
                container.append(value)
                kind, _ = self.pop()
                if kind == Token.RSQUARE:
                    value = stack.pop()[0]
                elif kind == Token.COMMA:
                    value = self._start_value(stack)
                else:
                    raise _ParseError("expected separator in list")
            else:
                key = frame[1]
                if key in container:
                    raise _ParseError("duplicate key")
                container[key] = value
                kind, _ = self.pop()
                if kind == Token.RCURLY:
                    value = stack.pop()[0]
                elif kind == Token.COMMA:
                    value = self._pair(stack)
                else:
                    raise _ParseError("expected separator in dict")

    def _first_member(self, stack: list[list[Any]]) -> JsonValue:
        """Just after ``{`` or ``[``: an empty container, or its first member."""
        container = stack[-1][0]
        kind = self.peek()
        if kind is None:
            raise _ParseError("premature EOI")
        if isinstance(container, list):
            if kind == Token.RSQUARE:
                self.pop()
                return stack.pop()[0]
            return self._start_value(stack)
        if kind == Token.RCURLY:
            self.pop()
            return stack.pop()[0]
        return self._pair(stack)

    def _pair(self, stack: list[list[Any]]) -> JsonValue:
        """``"key": value`` in an object: reads the key and the colon, then starts the value."""
        kind = self.peek()
        if kind is None:
            raise _ParseError("premature EOI")
        if kind not in _VALUE_STARTS:
            raise _ParseError("expecting value")
        if kind != Token.STRING:
            if kind in (Token.INTEGER, Token.FLOAT, Token.KEYWORD):
                self._literal(*self.pop())  # its own errors (an invalid keyword) come first, as in QEMU
            raise _ParseError("key is not a string in object")
        stack[-1][1] = _decode_string(self.pop()[1])
        colon, _ = self.pop()
        if colon != Token.COLON:
            raise _ParseError("missing : in object pair")
        return self._start_value(stack)

    def _start_value(self, stack: list[list[Any]]) -> JsonValue:
        """A scalar, or a new container pushed on the stack (returns _OPENED)."""
        kind = self.peek()
        if kind is None:
            raise _ParseError("premature EOI")
        if kind == Token.LCURLY or kind == Token.LSQUARE:
            self.pop()
            stack.append([{} if kind == Token.LCURLY else [], None])
            return _OPENED
        if kind not in _VALUE_STARTS:
            raise _ParseError("expecting value")
        return self._literal(*self.pop())

    @staticmethod
    def _literal(kind: Token, text: bytes) -> JsonValue:
        if kind == Token.STRING:
            return _decode_string(text)
        if kind == Token.KEYWORD:
            literal = {b"true": True, b"false": False, b"null": None}
            if text not in literal:
                raise _ParseError(f"invalid keyword '{_show(text)}'")
            return literal[text]
        if kind == Token.INTEGER:
            number = int(text)
            if _INT64_MIN <= number < _UINT64_END:
                return number
        return float(text)


_OPENED: Final = object()


def _decode_string(token: bytes) -> str:
    """A string token's value: QEMU's escapes (an escaped apostrophe too), surrogate pairs, strict UTF-8."""
    body = token[1:-1]
    if b"\\" not in body:
        return _utf8(body)
    parts: list[str] = []
    last = 0
    matches = list(_ESCAPE.finditer(body))
    joined = False
    for index, match in enumerate(matches):
        if joined:  # the low half of a surrogate pair, already taken
            joined = False
            last = match.end()
            continue
        parts.append(_utf8(body[last:match.start()]))
        last = match.end()
        escape = match.group(1)
        if escape in _SIMPLE_ESCAPES:
            parts.append(_SIMPLE_ESCAPES[escape])
            continue
        if escape[:1] != b"u":
            raise _ParseError("invalid escape sequence in string")
        bad = _ParseError(f"{_show(match.group(0))} is not a valid Unicode character")  # QEMU echoes the escape
        code = int(escape[1:], 16) if len(escape) == 5 else -1
        if code < 0 or 0xDC00 <= code <= 0xDFFF:
            raise bad
        if 0xD800 <= code <= 0xDBFF:
            following = matches[index + 1] if index + 1 < len(matches) else None
            low = _unicode_escape(following) if following is not None and following.start() == match.end() else -1
            if not 0xDC00 <= low <= 0xDFFF:
                raise bad
            code = 0x10000 + ((code & 0x3FF) << 10) + (low & 0x3FF)
            joined = True
        parts.append(chr(code))
    parts.append(_utf8(body[last:]))
    return "".join(parts)


def _unicode_escape(match: re.Match[bytes]) -> int:
    """The code unit of a ``\\uXXXX`` escape, or -1 for any other escape."""
    escape = match.group(1)
    return int(escape[1:], 16) if len(escape) == 5 and escape[:1] == b"u" else -1


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseError("invalid UTF-8 sequence in string") from None
