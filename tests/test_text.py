"""Text chosen by a stranger: bounded in errors (`shown`), inert on a terminal (`for_terminal`)."""

import time

from meshnode.core.text import SHOWN_LIMIT, for_terminal, shown


def test_for_terminal_escapes_every_control_a_terminal_acts_on() -> None:
    hostile = "a\x1b[2Jb\rc\x08d\x07e\x00f\x7fg\x9bh\u202ei\u2066j"
    out = for_terminal(hostile)
    assert out == "a\\x1b[2Jb\\x0dc\\x08d\\x07e\\x00f\\x7fg\\x9bh\\u202ei\\u2066j"
    for ch in out:
        assert ch.isprintable(), repr(ch)


def test_for_terminal_keeps_newlines_tabs_and_ordinary_unicode() -> None:
    text = "line one\n\tindented: héllo 日本語 🙂 — done\n"
    assert for_terminal(text) == text


def test_for_terminal_on_pieces_equals_for_terminal_on_the_whole() -> None:
    pieces = ["ab\x1b", "[31mred\r", "\x07", "ok\n"]
    assert "".join(for_terminal(p) for p in pieces) == for_terminal("".join(pieces))


def test_shown_cuts_a_long_string_and_says_how_long_it_was() -> None:
    out = shown("k" * 1_000_000)
    assert len(out) < SHOWN_LIMIT + 40
    assert "1000000 chars" in out


def test_shown_escapes_control_characters_so_the_result_is_one_printable_line() -> None:
    for value in ["\x1b[2J\r\n\x00", "\n" * 500, "\x00" * 10, b"\x1b\r\n" * 100]:
        out = shown(value)
        assert out.isprintable(), out
        assert len(out) < SHOWN_LIMIT + 40


def test_shown_never_renders_the_items_of_a_container_or_the_digits_of_a_huge_int() -> None:
    assert shown(["x" * 100] * 100_000) == "<list of 100000 items>"
    assert shown({"a": 1}) == "<dict of 1 items>"
    assert shown(1 << 100_000) == "<int of 100001 bits>"
    assert shown(42) == "42"
    assert shown(None) == "None"
    assert shown(object()) == "<object>"


def test_shown_costs_the_same_for_a_megabyte_as_for_a_byte() -> None:
    big = "é\x1b" * 500_000
    start = time.perf_counter()
    for _ in range(1000):
        shown(big)
    assert time.perf_counter() - start < 0.5  # O(limit): ~1 ms for 1000 calls here


def test_the_log_handlers_cut_a_megabyte_message_and_escape_terminal_controls() -> None:
    import io
    import logging

    from rich.console import Console

    from meshnode.cli.common import MAX_LOG_MESSAGE_CHARS, terminal_log_handler

    out = io.StringIO()
    handler = terminal_log_handler(Console(file=out, force_terminal=True, width=20_000))
    logger = logging.getLogger("meshnode.test_text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        start = time.perf_counter()
        logger.warning("peer said %s", "k" * (1 << 20))  # one long word: rich's worst case
        logger.warning("peer said %s", "\x1b]0;pwned\x07\x1b[2J")
        elapsed = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = out.getvalue()
    assert elapsed < 0.5, f"two log lines took {elapsed:.2f} s"  # 1 MiB took minutes before
    assert f"({(1 << 20) + len('peer said ')} chars)" in text
    lines = [line.rstrip() for line in text.splitlines()]  # rich pads to the console width
    assert len(lines) == 2 and max(map(len, lines)) < MAX_LOG_MESSAGE_CHARS + 200
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in text and "pwned\x07" not in text
