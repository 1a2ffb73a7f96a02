"""AUTOMATIC1111's prompt syntax, parsed without torch: emphasis, BREAK, prompt editing, alternation, extra networks.

    parse_attention("a (red:1.2) [fox]")  ->  [["a ", 1.0], ["red", 1.2], [" ", 1.0], ["fox", 0.909...]]
    schedule("a [cat:dog:0.5]", steps=10)  ->  [(5, "a cat"), (10, "a dog")]
    extract_networks("a fox <lora:style:0.8>")  ->  ("a fox ", [Network("lora", "style", 0.8, 0.8)])

The rules are AUTOMATIC1111's (`modules/prompt_parser.py`, `extra_networks.py`, v1.10), re-implemented here
(its code is AGPL and not used): what a prompt means there, it means here.

- Emphasis: `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.5)` sets the factor; nesting
  multiplies; an unclosed bracket applies to the end of the text; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal
  characters. `BREAK` (the capitalised word) starts a new 75-token chunk: it parses as `["BREAK", -1]`.
- Prompt editing: `[from:to:when]` uses `from` up to step `when` and `to` after it; `[to:when]` adds `to` after
  `when`, `[from::when]` removes `from` after it. A `when` written with a decimal point is a fraction of the
  steps (`0.5`, `1.0`), one without is a step number (`5`). `[a|b|c]` alternates a, b, c step by step.
  `schedule` returns (last step, text) pairs: the text holds up to and including that step (counted from 0 as
  A1111 counts its denoiser calls), so `[cat:dog:5]` uses "cat" for steps 0..5 and "dog" from step 6.
  A prompt whose brackets do not parse as these constructs is used as it is, as in A1111.
- Extra networks: `<lora:NAME:MULT>` (or `<lora:NAME:TE_MULT:UNET_MULT>`, or `te=`, `unet=` named) is removed
  from the text and returned; other `<kind:...>` tags likewise, for the caller to refuse or ignore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Network", "ParseError", "extract_networks", "parse_attention", "schedule", "strip_networks"]

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's emphasis factors for (x) and [x]

# One token of emphasis syntax: an escape, an opening bracket, a weight closing a round bracket, a closing
# bracket, a run of ordinary text, or a lone colon (ordinary text too).
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[list]:
    """`text` as [fragment, weight] pairs, runs of equal weight merged; ["BREAK", -1] where BREAK stands.

    The same list AUTOMATIC1111's `parse_prompt_attention` returns, e.g.
    'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).' -> [['a ', 1.0], ['house', 1.573...], [' ', 1.1],
    ['on', 1.0], [' a ', 1.1], ['hill', 0.55], [', sun, ', 1.1], ['sky', 1.4641...], ['.', 1.1]].
    """
    out: list[list] = []
    rounds: list[int] = []  # where each open bracket's fragments start
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])  # an escaped character (a lone backslash is dropped)
        elif token == "(":
            rounds.append(len(out))
        elif token == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    out = out or [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation: a small recursive-descent parser into a tree of nodes.


class ParseError(ValueError):
    """The text is not made of A1111's bracket constructs (it is then used literally)."""


@dataclass
class _Scheduled:
    before: list  # nodes (empty for [to:when])
    after: list
    when: str  # as written: its form (decimal point or not) decides fraction or step


@dataclass
class _Alternate:
    options: list[list]


_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*]")


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def top(self) -> list:
        """The whole text: constructs where they parse, their brackets as characters where they do not."""
        nodes: list = []
        while self.i < len(self.text):
            c = self.text[self.i]
            if c in "([":
                start = self.i
                try:
                    nodes.append(self.construct())
                    continue
                except ParseError:
                    self.i = start  # not a construct: the bracket is a character
            if c in "([]):":
                nodes.append(c)
                self.i += 1
            elif c == "|":
                raise ParseError("'|' outside [a|b]")
            else:
                nodes.append(self.plain())
        return nodes

    def plain(self) -> str:
        """Ordinary characters and escapes, up to the next bracket, ':' or '|'."""
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in "()[]:|":
            if self.text[self.i] == "\\":
                if self.i + 1 >= len(self.text) or self.text[self.i + 1] == "\n":  # A1111's `\\.`: no newline
                    raise ParseError("a backslash that escapes nothing")
                self.i += 1
            self.i += 1
        return self.text[start:self.i]

    def sequence(self) -> list:
        """Text and constructs up to the next ':', '|' or closing bracket (not consumed)."""
        nodes: list = []
        while self.i < len(self.text):
            c = self.text[self.i]
            if c in "([":
                nodes.append(self.construct())
            elif c in ":|)]":
                break
            else:
                nodes.append(self.plain())
        return nodes

    def expect(self, c: str) -> None:
        if self.i >= len(self.text) or self.text[self.i] != c:
            raise ParseError(f"expected {c!r} at {self.i}")
        self.i += 1

    def construct(self):
        if self.text[self.i] == "(":
            self.i += 1
            inner = self.sequence()
            if self.i < len(self.text) and self.text[self.i] == ":":
                self.i += 1
                inner = ["(", *inner, ":", *self.sequence()]
            else:
                inner = ["(", *inner]
            self.expect(")")
            return [*inner, ")"]
        self.i += 1
        first = self.sequence()
        c = self.text[self.i] if self.i < len(self.text) else ""
        if c == "]":
            self.i += 1
            return ["[", *first, "]"]
        if c == "|":
            options = [first]
            while self.i < len(self.text) and self.text[self.i] == "|":
                self.i += 1
                options.append(self.sequence())
            self.expect("]")
            return _Alternate(options)
        self.expect(":")
        number = _NUMBER.match(self.text, self.i)
        if number:  # [to:when]
            self.i = number.end()
            return _Scheduled([], first, number.group(1))
        second = self.sequence()
        self.expect(":")
        number = _NUMBER.match(self.text, self.i)
        if not number:
            raise ParseError(f"expected a step number at {self.i}")
        self.i = number.end()
        return _Scheduled(first, second, number.group(1))


def _when(written: str, steps: int) -> int:
    """A1111's rule: with a decimal point a fraction of the steps, else a step number; at most `steps`."""
    value = float(written)
    return min(steps, int(value * steps if "." in written else value))


def _steps(nodes: list, steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = _when(node.when, steps)
            if when >= 1:
                found.add(when)
            _steps(node.before, steps, found)
            _steps(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _steps(option, steps, found)
        elif isinstance(node, list):
            _steps(node, steps, found)


def _text(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_text(node.before if step <= _when(node.when, steps) else node.after, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_text(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(_text(node, step, steps))
    return "".join(out)


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """(last step, text) pairs for prompt editing and alternation over `steps` steps (A1111's
    `get_learned_conditioning_prompt_schedules` for one prompt). A prompt without them: [(steps, prompt)]."""
    try:
        nodes = _Parser(prompt).top()
    except ParseError:
        return [(steps, prompt)]
    found = {steps}
    _steps(nodes, steps, found)
    return [(s, _text(nodes, s, steps)) for s in sorted(found)]


# ---------------------------------------------------------------------------------------------
# Extra networks: <lora:name:multiplier>.


@dataclass(frozen=True)
class Network:
    """One `<kind:name:...>` tag: a LoRA with its text-encoder and U-Net multipliers."""

    kind: str  # "lora" (A1111 also reads "lyco" as a LoRA)
    name: str
    te: float = 1.0
    unet: float = 1.0


_TAG = re.compile(r"<(\w+):([^>]+)>")


def _network(kind: str, args: str) -> Network:
    parts = args.split(":")
    name, positional, named = parts[0].strip(), [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            named[key.strip()] = value
        else:
            positional.append(part)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        raise ValueError(f"<{kind}:{args}>: multipliers must be numbers, e.g. <{kind}:{name}:0.8>") from None
    if not name:
        raise ValueError(f"<{kind}:{args}>: no name")
    return Network("lora" if kind == "lyco" else kind, name, te, unet)


def extract_networks(prompt: str) -> tuple[str, list[Network]]:
    """(the prompt without its `<kind:...>` tags, the tags in order). A1111's `parse_prompt` rules: the tag text is
    removed where it stands (spaces around it stay); `te=` and `unet=` name the multipliers; one number sets both."""
    networks = [_network(m.group(1), m.group(2)) for m in _TAG.finditer(prompt)]
    return _TAG.sub("", prompt), networks


def strip_networks(prompt: str) -> str:
    """The prompt without its `<kind:...>` tags."""
    return _TAG.sub("", prompt)
