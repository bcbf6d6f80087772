"""Showing text that someone else chose: bounded in error messages, inert on a terminal.

Two helpers, both sans-io and pure:

- `shown(value)` renders a peer-supplied value for an error message or a log line. It costs
  O(limit) whatever the value's size: a 1 MiB string, a list of a million items or a
  10,000-digit int all come out as a short, escaped, single-line text. Every error message
  built from peer input goes through it, so a stranger cannot make a log line (and the
  work of formatting, highlighting and writing it) as large as their frame.
- `for_terminal(text)` escapes the control characters a terminal acts on (ESC, CR, BS,
  BEL, NUL, the C1 controls, bidirectional overrides) so that text from an untrusted
  provider cannot move the cursor, rewrite earlier lines, set the window title or hide
  text. Newlines and tabs are kept. Use it only where text reaches a terminal; `--json`
  and the API carry the text unchanged.

Not verified: that the text is *true* or harmless to read; only that it cannot drive the
terminal. Zero-width and look-alike characters are left alone (they change how text reads,
not what the terminal does).
"""

from __future__ import annotations

# The default bound on a shown value: long enough to recognise a key name or a type tag,
# short enough that a log line carrying three of them stays on one screen line.
SHOWN_LIMIT = 64

_ELLIPSIS = "…"


def _escape_all_controls(text: str) -> str:
    """`text` with every non-printable character (newline and tab included) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """A bounded, single-line, escaped rendering of `value` for an error message or log.

    Strings and bytes are quoted like `repr` (control characters escaped) and cut to
    about `limit` characters, with the total length noted when cut. Containers show their
    type and size, never their items (their repr could be anything). Ints show their value
    when short, else their size in bits. Other values show their type name only."""
    if isinstance(value, str):
        head = value[:limit]
        body = repr(head)
        if len(body) > limit + 2:  # escapes grew it: cut the escaped form too
            body = body[: limit + 1] + _ELLIPSIS + body[0]
        if len(value) > limit:
            return f"{body}{_ELLIPSIS}({len(value)} chars)"
        return _escape_all_controls(body)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[:limit])
        size = len(value)
        body = repr(raw)
        if len(body) > limit + 3:
            body = body[: limit + 2] + _ELLIPSIS + body[-1]
        return f"{body}{_ELLIPSIS}({size} bytes)" if size > limit else body
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        # str() of a huge int is quadratic (and Python refuses past 4,300 digits).
        if value.bit_length() <= 64:
            return str(value)
        return f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return f"<{type(value).__name__}>"


def _terminal_table() -> dict[int, str]:
    """Code point -> visible escape, for every character a terminal acts on but \\n, \\t."""
    table: dict[int, str] = {}
    controls = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]  # C0, DEL, C1 (0x9B is CSI)
    for cp in controls:
        if cp in (0x09, 0x0A):
            continue
        table[cp] = f"\\x{cp:02x}"
    # Bidirectional marks, embeddings, overrides and isolates ("Trojan Source", CVE-2021-42574)
    # reorder what the user sees; line/paragraph separators break lines without a newline.
    for cp in (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029):
        table[cp] = f"\\u{cp:04x}"
    return table


_TERMINAL_TABLE = _terminal_table()


def for_terminal(text: str) -> str:
    """`text` with the characters a terminal would act on escaped as visible `\\xNN`.

    Keeps newline and tab; escapes ESC, CR, BS, BEL, NUL and the other C0 controls, DEL,
    the C1 controls and bidirectional overrides. Linear in `len(text)`; safe to call on
    each streamed piece, since every escaped character is escaped on its own."""
    return text.translate(_TERMINAL_TABLE)
