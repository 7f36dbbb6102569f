"""``scenecluster.errors.one_line``: the one-line form of an exception used in user-facing messages."""

from __future__ import annotations

from scenecluster.errors import one_line


def test_first_line_only() -> None:
    assert one_line(ValueError("  bad value\nTraceback detail\nmore  ")) == "bad value"


def test_empty_message_is_named_by_its_type() -> None:
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("   ")) == "OSError"


def test_with_type_prefixes_the_type_name() -> None:
    assert one_line(OSError("disk full\nerrno 28"), with_type=True) == "OSError: disk full"
    assert one_line(OSError(), with_type=True) == "OSError: OSError"


def test_long_messages_are_shortened_to_the_limit() -> None:
    text = one_line(RuntimeError("x" * 1000))
    assert len(text) == 300 and text.endswith("...")
    assert one_line(RuntimeError("abcdefghij"), limit=8) == "abcde..."
    assert one_line(RuntimeError("abcdefgh"), limit=8) == "abcdefgh"
    assert len(one_line(RuntimeError("y" * 50), limit=20, with_type=True)) == 20
