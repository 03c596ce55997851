"""Regular expressions from untrusted files, matched without backtracking.

PEFT's ``rank_pattern`` / ``alpha_pattern`` keys are regexes, and an adapter folder is data
downloaded from anywhere: handing its keys to :mod:`re` lets a crafted key (``(a+)+$``) spin
for hours. This module parses the common subset of Python's regex syntax (literals, ``.``,
classes, escapes like ``\\d``, groups, alternation, ``* + ? {m,n}``, ``^ $``) into a small
automaton and runs it by tracking the set of live states (Thompson's construction), so matching
costs at most (pattern size x text length) steps whatever the pattern. Features that need
backtracking (backreferences, lookaround, inline flags) are refused with :class:`PatternError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MAX_PROGRAM = 20_000  # automaton size limit: bounds the cost of `{m,n}` expansions
MAX_REPEAT = 1_000  # largest count Python's own `{m,n}` would have to unroll here


class PatternError(ValueError):
    """The pattern is malformed or uses a feature that is not run here."""


CharTest = Callable[[str], bool]


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CLASS_ESCAPES: dict[str, CharTest] = {
    "d": str.isdecimal, "D": lambda c: not c.isdecimal(),
    "w": _word, "W": lambda c: not _word(c),
    "s": str.isspace, "S": lambda c: not c.isspace(),
}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}

# --------------------------------------------------------------------------- syntax tree
# ("chars", test) one character | ("cat", [nodes]) | ("alt", [nodes])
# ("rep", node, lo, hi or None) | ("bol",) | ("eol",)

Node = tuple


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def error(self, what: str) -> PatternError:
        return PatternError(f"{what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> Node:
        node = self.alternation(depth=0)
        if self.i < len(self.p):  # a stray ')'
            raise self.error("unbalanced parenthesis")
        return node

    def alternation(self, depth: int) -> Node:
        if depth > 100:
            raise self.error("groups nested too deeply")
        branches = [self.sequence(depth)]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence(depth))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self, depth: int) -> Node:
        items: list[Node] = []
        while (c := self.peek()) is not None and c not in "|)":
            atom = self.atom(depth)
            items.append(self.quantified(atom))
        return ("cat", items)

    def quantified(self, atom: Node) -> Node:
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if atom[0] in ("bol", "eol"):
            raise self.error("nothing to repeat")
        if self.peek() in ("?", "+"):  # lazy or possessive: same set of matches here
            self.i += 1
        if self.quantifier(probe=True) is not None:
            raise self.error("multiple repeat")
        return ("rep", atom, *bounds)

    def quantifier(self, probe: bool = False) -> tuple[int, int | None] | None:
        c = self.peek()
        simple = {"*": (0, None), "+": (1, None), "?": (0, 1)}
        if c in simple:
            if not probe:
                self.i += 1
            return simple[c]
        if c != "{":
            return None
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        body = self.p[self.i + 1:end]
        lo_text, comma, hi_text = body.partition(",")
        if not (lo_text.isdigit() or lo_text == "") or not (hi_text.isdigit() or hi_text == ""):
            return None  # not a repeat: Python reads `{` literally
        if not comma and not lo_text:
            return None
        if not all(t.isascii() for t in (lo_text, hi_text)):
            return None
        lo = int(lo_text) if lo_text else 0
        hi = (int(hi_text) if hi_text else None) if comma else lo
        if probe:
            return lo, hi
        if hi is not None and hi < lo:
            raise self.error("min repeat greater than max repeat")
        if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
            raise self.error(f"repeat count over {MAX_REPEAT}")
        self.i = end + 1
        return lo, hi

    def atom(self, depth: int) -> Node:
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.peek() == "?":
                if self.p.startswith("?:", self.i):
                    self.i += 2
                elif self.p.startswith("?P<", self.i):
                    close = self.p.find(">", self.i)
                    name = self.p[self.i + 3:close] if close > 0 else ""
                    if not name.isidentifier():
                        raise self.error("bad group name")
                    self.i = close + 1
                else:
                    raise self.error("lookaround, backreferences and inline flags are not "
                                     "supported")
            inner = self.alternation(depth + 1)
            if self.peek() != ")":
                raise self.error("missing ), unterminated subpattern")
            self.i += 1
            return inner
        if c == ")":
            raise self.error("unbalanced parenthesis")
        if c in "*+?":
            raise self.error("nothing to repeat")
        if c == "{" and self.quantifier(probe=True) is not None:
            self.i -= 1
            raise self.error("nothing to repeat")
        if c == ".":
            return ("chars", lambda ch: ch != "\n")
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "[":
            return ("chars", self.char_class())
        if c == "\\":
            return self.escape()
        return ("chars", c.__eq__)

    def escape(self) -> Node:
        c = self.peek()
        if c is None:
            raise self.error("bad escape (end of pattern)")
        self.i += 1
        if c == "A":
            return ("bol",)
        if c == "Z":
            return ("eol",)
        if c in _CLASS_ESCAPES:
            return ("chars", _CLASS_ESCAPES[c])
        return ("chars", self.escaped_char(c).__eq__)

    def escaped_char(self, c: str) -> str:
        if c in _CHAR_ESCAPES:
            return _CHAR_ESCAPES[c]
        if c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad escape \\{c}")
            self.i += width
            try:
                return chr(int(digits, 16))
            except (ValueError, OverflowError):
                raise self.error(f"bad escape \\{c}{digits}") from None
        if c.isascii() and c.isalnum():
            # backreferences (\1), word boundaries (\b) and unknown letters
            raise self.error(f"escape \\{c} is not supported")
        return c

    def char_class(self) -> CharTest:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        singles: set[str] = set()
        ranges: list[tuple[str, str]] = []
        tests: list[CharTest] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character set")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            low: str | None
            if c == "\\":
                e = self.peek()
                if e is None:
                    raise self.error("unterminated character set")
                self.i += 1
                if e in _CLASS_ESCAPES:
                    if (self.peek() == "-" and self.i + 1 < len(self.p)
                            and self.p[self.i + 1] != "]"):
                        raise self.error("bad character range")
                    tests.append(_CLASS_ESCAPES[e])
                    continue
                low = "\b" if e == "b" else self.escaped_char(e)
            else:
                low = c
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                h = self.p[self.i]
                self.i += 1
                if h == "\\":
                    e = self.peek()
                    if e is None or e in _CLASS_ESCAPES:
                        raise self.error("bad character range")
                    self.i += 1
                    h = "\b" if e == "b" else self.escaped_char(e)
                if h < low:
                    raise self.error("bad character range")
                ranges.append((low, h))
            else:
                singles.add(low)

        def test(ch: str) -> bool:
            hit = ch in singles or any(lo <= ch <= hi for lo, hi in ranges) or any(
                t(ch) for t in tests)
            return hit != negate

        return test


# --------------------------------------------------------------------------- automaton


@dataclass(frozen=True)
class _Op:
    kind: str  # "chars", "split", "jmp", "bol", "eol", "match"
    test: CharTest | None = None
    a: int = 0
    b: int = 0


class _Compiler:
    def __init__(self) -> None:
        self.ops: list[list] = []  # [kind, test, a, b], patched in place

    def emit(self, kind: str, test: CharTest | None = None, a: int = 0, b: int = 0) -> int:
        if len(self.ops) >= MAX_PROGRAM:
            raise PatternError("pattern too large")
        self.ops.append([kind, test, a, b])
        return len(self.ops) - 1

    def node(self, n: Node) -> None:
        kind = n[0]
        if kind == "chars":
            self.emit("chars", n[1])
        elif kind in ("bol", "eol"):
            self.emit(kind)
        elif kind == "cat":
            for item in n[1]:
                self.node(item)
        elif kind == "alt":
            jumps = []
            for branch in n[1][:-1]:
                split = self.emit("split")
                self.ops[split][2] = len(self.ops)
                self.node(branch)
                jumps.append(self.emit("jmp"))
                self.ops[split][3] = len(self.ops)
            self.node(n[1][-1])
            for j in jumps:
                self.ops[j][2] = len(self.ops)
        else:  # rep
            _, inner, lo, hi = n
            for _ in range(lo):
                self.node(inner)
            if hi is None:
                split = self.emit("split")
                self.ops[split][2] = len(self.ops)
                self.node(inner)
                self.emit("jmp", a=split)
                self.ops[split][3] = len(self.ops)
            else:
                splits = []
                for _ in range(hi - lo):
                    split = self.emit("split")
                    self.ops[split][2] = len(self.ops)
                    splits.append(split)
                    self.node(inner)
                for split in splits:
                    self.ops[split][3] = len(self.ops)

    def program(self, n: Node) -> tuple[_Op, ...]:
        self.node(n)
        self.emit("match")
        return tuple(_Op(k, t, a, b) for k, t, a, b in self.ops)


class SafePattern:
    """A compiled pattern; :meth:`match_module` and :meth:`search` never backtrack."""

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise PatternError("pattern is not a string")
        self.pattern = pattern
        tree = _Parser(pattern).parse()
        any_char: Node = ("chars", lambda ch: ch != "\n")
        # PEFT: re.match(rf"(.*\.)?({key})$", module_name)
        module = ("cat", [("rep", ("cat", [("rep", any_char, 0, None), ("chars", ".".__eq__)]),
                           0, 1), tree, ("eol",)])
        self._module = _Compiler().program(module)
        self._search = _Compiler().program(("cat", [("rep", any_char, 0, None), tree]))

    def match_module(self, name: str) -> bool:
        """Whether PEFT would apply this ``rank_pattern``/``alpha_pattern`` key to ``name``."""
        return _run(self._module, name)

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text`` (``re.search``)."""
        return _run(self._search, text)


def _closure(prog: tuple[_Op, ...], starts: list[int], pos: int, text: str,
             into: list[int], seen: set[int]) -> bool:
    """Add the character-consuming states reachable from ``starts``; True if one accepts."""
    stack = list(reversed(starts))
    accepted = False
    n = len(text)
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        op = prog[pc]
        kind = op.kind
        if kind == "chars":
            into.append(pc)
        elif kind == "match":
            accepted = True
        elif kind == "jmp":
            stack.append(op.a)
        elif kind == "split":
            stack.append(op.b)
            stack.append(op.a)
        elif kind == "bol":
            if pos == 0:
                stack.append(pc + 1)
        elif pos == n or (pos == n - 1 and text[-1] == "\n"):  # eol, as Python's `$`
            stack.append(pc + 1)
    return accepted


def _run(prog: tuple[_Op, ...], text: str) -> bool:
    """re.match semantics: True when the program accepts some prefix of ``text``."""
    live: list[int] = []
    if _closure(prog, [0], 0, text, live, set()):
        return True
    for pos, ch in enumerate(text):
        nxt: list[int] = []
        seen: set[int] = set()
        starts = [pc + 1 for pc in live if prog[pc].test(ch)]  # type: ignore[misc]
        if _closure(prog, starts, pos + 1, text, nxt, seen):
            return True
        if not nxt:
            return False
        live = nxt
    return False


def compile_safe(pattern: str) -> SafePattern:
    """Parse ``pattern``; :class:`PatternError` says why one is refused."""
    return SafePattern(pattern)
