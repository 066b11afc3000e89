"""Pieces to client text: UTF-8 reassembly and stop strings (pure)."""

from __future__ import annotations

import pytest

from agent.engine.textstream import StopMatcher, TextStream, Utf8Assembler


def feed_all(stream: TextStream, pieces: list[bytes]) -> tuple[str, bool]:
    out = []
    stopped = False
    for p in pieces:
        text, stopped = stream.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(stream.flush())
    return "".join(out), stopped


def test_multibyte_character_split_across_tokens_is_held_until_complete() -> None:
    utf8 = Utf8Assembler()
    euro = "€".encode()
    assert utf8.feed(euro[:1]) == ""
    assert utf8.feed(euro[1:2]) == ""
    assert utf8.feed(euro[2:] + b"!") == "€!"


def test_truncated_character_at_the_end_becomes_a_replacement_char() -> None:
    utf8 = Utf8Assembler()
    assert utf8.feed("é".encode()[:1]) == ""
    assert utf8.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("pieces", "stops", "text", "stopped"),
    [
        pytest.param([b"1, 2,", b" 3,", b" 4"], [" 3"], "1, 2,", True, id="stop-at-token-start"),
        pytest.param([b"ab", b"cd", b"ef"], ["cde"], "ab", True, id="stop-spans-tokens"),
        pytest.param([b"abc", b"d"], ["xyz"], "abcd", False, id="no-stop"),
        pytest.param([b"ab", b"c"], ["cd"], "abc", False, id="held-prefix-flushed-at-end"),
        pytest.param([b"hello wor", b"ld"], ["wor", "hello"], "", True, id="earliest-stop-wins"),
        pytest.param([b"x", b"END", b"more"], ["END"], "x", True, id="stop-is-a-whole-token"),
        pytest.param([b"a", b"b"], [""], "ab", False, id="empty-stop-ignored"),
        pytest.param(["Grüß".encode()[:3], "Grüß".encode()[3:]], ["ß"], "Grü", True, id="utf8-stop"),
    ],
)
def test_stop_strings(pieces: list[bytes], stops: list[str], text: str, stopped: bool) -> None:
    assert feed_all(TextStream(stops), pieces) == (text, stopped)


def test_text_that_may_start_a_stop_is_held_back() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("hi <") == ("hi ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("x") == ("</x", False)


def test_nothing_after_a_stop_is_emitted() -> None:
    m = StopMatcher(["."])
    assert m.feed("one. two") == ("one", True)
    assert m.feed("three") == ("", True)
    assert m.flush() == ""
