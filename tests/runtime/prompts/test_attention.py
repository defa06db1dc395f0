"""parse_attention: A1111's documented examples exactly, and agreement with the reference."""

import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts import parse_attention
from tests.runtime.prompts.a1111_reference import parse

# A1111's own examples for parse_prompt_attention (its docstring), floats to the last bit.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_a1111_examples(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text", [
    "", "a BREAK b", "BREAK", "aBREAK b BREAKing", "x:1.2)", "[[a] b (c:0.3) : d",
    ")) ]] ((x]", "a \\ b \\\\ c", "(a:1.2 b)", "red:  1.5)", "a(b[c(d:2)e]f)g:)",
    "(red:-0.5) [[blue]] (green:+2)", "a, (b, c:1.1), d BREAK e,f",
])
def test_agrees_with_the_reference(text):
    assert parse_attention(text) == parse(text)


def test_break_is_a_whole_case_sensitive_word():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("a break b BREAKS") == [("a break b BREAKS", 1.0)]


def test_break_inside_brackets_still_breaks_and_is_never_weighted():
    # A1111 would weight it into the literal word "BREAK" at -1.1 (module docstring).
    assert parse_attention("(a BREAK b") == [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]


def test_a_weight_that_is_not_a_number_is_one_line():
    with pytest.raises(InputError, match="prompt weight '1.2.3' is not a number"):
        parse_attention("(red:1.2.3)")
