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
