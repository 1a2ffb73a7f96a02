"""sdxl.prompts: AUTOMATIC1111's prompt syntax. The golden cases are the examples AUTOMATIC1111 documents for
`parse_prompt_attention` and `get_learned_conditioning_prompt_schedules` (v1.10 rules), plus edge cases checked
against its grammar."""

from __future__ import annotations

import pytest

from sdxl.prompts import Network, extract_networks, parse_attention, schedule


@pytest.mark.parametrize("text, expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ["a ", 1.0], ["house", 1.1 * 1.1 * 1.3], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.1 ** 4], [".", 1.1]]),
    ("", [["", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("(a BREAK b:1.5)", [["a", 1.5], ["BREAK", -1.5], ["b", 1.5]]),  # as A1111: scaled, so no longer a break
    ("aBREAKb", [["aBREAKb", 1.0]]),  # BREAK only as a word
    ("[x]", [["x", 1 / 1.1]]),
    ("((x:2))", [["x", 2 * 1.1]]),
    ("x:1.5)", [["x:1.5)", 1.0]]),  # a weight needs an open bracket
    ("a \\\\ b \\ c", [["a \\ b  c", 1.0]]),  # an escaped backslash stays, a lone one goes
])
def test_parse_attention_matches_a1111(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),  # '|' outside an alternation: taken literally
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fromthis:tothis:1.0]", [(10, "fromthis")]),  # with a decimal point: a fraction of the steps
    ("[cat:dog:5]", [(5, "cat"), (10, "dog")]),
    ("a [b|] c", [(i, "a b c" if i % 2 else "a  c") for i in range(1, 11)]),
    ("a | b [c:3]", [(10, "a | b [c:3]")]),
    ("x [a:b:3 ]", [(3, "x a"), (10, "x b")]),
    ("[a::0.25] z", [(2, "a z"), (10, " z")]),
    ("a\\", [(10, "a\\")]),
])
def test_schedule_matches_a1111(prompt, expected):
    assert schedule(prompt, 10) == expected


def test_extract_networks():
    text, nets = extract_networks("a fox <lora:style:0.8>, <lora:detail:0.5:1.2> <lyco:x:te=0.3:unet=0.7><lora:plain>")
    assert text == "a fox ,  "
    assert nets == [Network("lora", "style", 0.8, 0.8), Network("lora", "detail", 0.5, 1.2),
                    Network("lora", "x", 0.3, 0.7), Network("lora", "plain", 1.0, 1.0)]
    with pytest.raises(ValueError, match="multipliers must be numbers"):
        extract_networks("<lora:style:strong>")
