"""The web UI's prompt syntax: emphasis, BREAK, prompt editing, alternation and AND.

- ``parse_attention(text)``: ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:1.5)`` sets 1.5, nesting multiplies,
  brackets left open still apply, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, BREAK
  (a whole word outside brackets) becomes ``("BREAK", -1.0)``.
- ``schedules(prompts, steps)``: ``[a:b:N]``, ``[a:N]``, ``[a::N]``, ``[a|b|c]``, nested, as
  per-step texts ``[(end_at_step, text), ...]``.
- ``split_and(prompt)``: composable diffusion, ``a AND b :0.5``.

The behaviour follows the web UI's ``modules/prompt_parser.py``; text that cannot be parsed is
kept literally and never raises.
"""
from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1

_RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) pairs; neighbours of equal weight are merged.

    >>> parse_attention("a (b:1.5) [c]")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091)]

    The web UI's algorithm (each closing bracket multiplies every piece since its opening), with
    one bound: brackets nested more than ``MAX_DEPTH`` deep are kept as literal text, so the work
    is at most ``MAX_DEPTH`` multiplications per piece (unbounded, 30,000 nested ``(a`` took 28 s)
    and a weight is at most 1.1 ** 100 from its brackets.
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float):
        for p in range(start, len(res)):      # never a BREAK: those exist only outside brackets
            res[p][1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece in "([" and len(round_open) + len(square_open) >= MAX_DEPTH:
            res.append([piece, 1.0])            # too deep: a literal bracket
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        elif round_open or square_open:     # inside brackets BREAK is a plain word
            res.append([piece, 1.0])
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, ROUND)
    for pos in square_open:
        multiply(pos, SQUARE)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for piece, weight in res[1:]:
        if weight == merged[-1][1] and not (weight == -1.0 and piece == "BREAK"):
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(p, float(w)) for p, w in merged]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# Prompt editing and alternation follow the web UI's grammar (a lark Earley grammar there):
#
#   start: (prompt | /[][():]/+)*
#   prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
#   alternate: "[" prompt ("|" [prompt])+ "]"
#   plain: /([^\\\[\]():|]|\\.)+/
#
# parsed here by memoised recursive descent: a bracket that opens a construct which does not
# close is literal text at the top level (the stray /[][():]/ of the grammar). Earley parsing
# takes minutes on a few hundred alternations; this is linear in practice. The test suite
# checks it against the grammar itself (lark) on random bracket soup.

MAX_DEPTH = 100          # deeper nesting is kept literally rather than parsed
_RE_NUMBER_CLOSE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")


class _Unparsable(Exception):
    pass


class _EditParser:
    """Nodes: str (literal text), ("sched", before|None, after, when), ("alt", [options]);
    a list is a sequence of nodes."""

    def __init__(self, text: str):
        self.s, self.n = text, len(text)
        self.prompts: dict[int, tuple[list, int]] = {}
        self.constructs: dict[int, tuple | None] = {}

    def parse(self) -> list:
        s, n, i, out = self.s, self.n, 0, []
        while i < n:
            c = s[i]
            if c in "[(":
                r = self.construct(i, 1)
                if r is not None:
                    out.append(r[0])
                    i = r[1]
                    continue
                out.append(c)           # a stray bracket is text at the top level
                i += 1
            elif c in "]):":
                out.append(c)
                i += 1
            elif c == "|" or (c == "\\" and (i + 1 >= n or s[i + 1] == "\n")):
                raise _Unparsable(c)
            else:
                j = self._plain_end(i)
                out.append(s[i:j])
                i = j
        return out

    def _plain_end(self, i: int) -> int:
        s, n = self.s, self.n
        while i < n:
            c = s[i]
            if c == "\\":
                if i + 1 >= n or s[i + 1] == "\n":
                    return i
                i += 2
            elif c in "[]():|":
                return i
            else:
                i += 1
        return i

    def prompt(self, i: int, depth: int) -> tuple[list, int]:
        if i in self.prompts:
            return self.prompts[i]
        start, items = i, []
        while i < self.n:
            c = self.s[i]
            if c in "[(":
                r = self.construct(i, depth + 1)
                if r is None:
                    break
                items.append(r[0])
                i = r[1]
            elif c in "]):|":
                break
            else:
                j = self._plain_end(i)
                if j == i:
                    break
                items.append(self.s[i:j])
                i = j
        self.prompts[start] = (items, i)
        return items, i

    def construct(self, i: int, depth: int):
        if i in self.constructs:
            return self.constructs[i]
        if depth > MAX_DEPTH:
            raise _Unparsable("nesting")
        r = self._round(i, depth) if self.s[i] == "(" else self._square(i, depth)
        self.constructs[i] = r
        return r

    def _at(self, i: int, ch: str) -> bool:
        return i < self.n and self.s[i] == ch

    def _round(self, i, depth):
        p1, j = self.prompt(i + 1, depth)
        if self._at(j, ")"):
            return ["(", p1, ")"], j + 1
        if self._at(j, ":"):
            p2, k = self.prompt(j + 1, depth)
            if self._at(k, ")"):
                return ["(", p1, ":", p2, ")"], k + 1
        return None

    def _square(self, i, depth):
        p1, j = self.prompt(i + 1, depth)
        if self._at(j, "]"):
            return ["[", p1, "]"], j + 1
        if self._at(j, "|"):
            options = [p1]
            while self._at(j, "|"):
                p, j = self.prompt(j + 1, depth)
                options.append(p)
            return (("alt", options), j + 1) if self._at(j, "]") else None
        if self._at(j, ":"):
            m = _RE_NUMBER_CLOSE.match(self.s, j + 1)
            if m:                                               # [after:N]
                return ("sched", None, p1, m.group(1)), m.end()
            p2, k = self.prompt(j + 1, depth)
            if self._at(k, ":"):
                m = _RE_NUMBER_CLOSE.match(self.s, k + 1)
                if m:                                           # [before:after:N]
                    return ("sched", p1, p2, m.group(1)), m.end()
        return None


def _walk(node, visit):
    if isinstance(node, list):
        for item in node:
            _walk(item, visit)
    elif isinstance(node, tuple):
        visit(node)
        if node[0] == "sched":
            _walk(node[1] or [], visit)
            _walk(node[2], visit)
        else:
            for option in node[1]:
                _walk(option, visit)


def _text_at(node, step: int, when: dict) -> str:
    """The prompt's text at ``step`` (steps count from 1)."""
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "".join(_text_at(x, step, when) for x in node)
    if node[0] == "sched":
        return _text_at(node[1] or [], step, when) if step <= when[id(node)] else _text_at(node[2], step, when)
    options = node[1]
    return _text_at(options[(step - 1) % len(options)], step, when)


def _boundary(number: str, steps: int, int_offset: int, flt_offset: float) -> int:
    v = float(number)
    v = (v - flt_offset) * steps if "." in number else v - int_offset
    if v != v or v == float("-inf"):
        return 0
    return steps if v >= steps else int(v)


def _schedule_one(prompt: str, steps: int, int_offset: int, flt_offset: float) -> list[tuple[int, str]]:
    if "[" not in prompt:          # no editing or alternation: the parse gives the text back
        return [(steps, prompt)]
    try:
        tree = _EditParser(prompt).parse()
    except _Unparsable:
        return [(steps, prompt)]
    when: dict[int, int] = {}
    boundaries = {steps}

    def visit(node):
        if node[0] == "sched":
            when[id(node)] = _boundary(node[3], steps, int_offset, flt_offset)
            if when[id(node)] >= 1:
                boundaries.add(when[id(node)])
        else:
            boundaries.update(range(1, steps + 1))

    _walk(tree, visit)
    return [(t, _text_at(tree, t, when)) for t in sorted(boundaries)]


def schedules(prompt_list, steps: int, hires_steps: int | None = None) -> list[list[tuple[int, str]]]:
    """For each prompt, its ``(end_at_step, text)`` pairs: ``text`` holds for steps up to
    and including ``end_at_step`` (steps count from 1).

    A boundary with a decimal point is a fraction of the steps (``int(v * steps)``), without
    one a step count. With ``hires_steps`` the boundaries refer to the second (hires) pass as
    in the web UI: a fraction is taken from 1.0 up, a count from ``steps`` up.

    >>> schedules(["a [b:3]"], 10)
    [[(3, 'a '), (10, 'a b')]]
    """
    if hires_steps is None:
        int_offset, flt_offset, n = 0, 0.0, steps
    else:
        int_offset, flt_offset, n = steps, 1.0, hires_steps
    cache: dict[str, list[tuple[int, str]]] = {}
    out = []
    for p in prompt_list:
        if p not in cache:
            cache[p] = _schedule_one(p, n, int_offset, flt_offset)
        out.append(cache[p])
    return out


_RE_AND = re.compile(r"\bAND\b")
_RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion: ``"a AND b :0.5"`` -> ``[("a ", 1.0), (" b", 0.5)]``."""
    parts = []
    for sub in _RE_AND.split(prompt):
        m = _RE_WEIGHT.search(sub)
        text, weight = m.groups() if m is not None else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts
