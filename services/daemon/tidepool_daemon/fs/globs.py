"""Glob matching in time linear in the name: the pattern becomes a Thompson NFA, simulated one character at a
time, so no pattern can make a match backtrack (a regex translation such as fnmatch's can: `*a*a*a*a*b`
against a long run of `a` takes time exponential in the number of stars in a backtracking engine).

The dialect (the one Daytona's `/files/search` documents: doublestar's):

- `*` any run of characters except `/`; `?` one character except `/`;
- `**` any run of characters including `/`; `**/` also matches no directory at all (`src/**/*.go` finds
  `src/a.go`);
- `[abc]`, `[a-z]` one character of the set, `[!...]` or `[^...]` one character outside it (never `/`);
  `]` right after the opening bracket is literal, and a `[` without its `]` is literal;
- `{a,b,c}` one of the alternatives, which may nest and contain any of the above; a `{` without its `}`
  is literal;
- `\\x` the character x itself; everything else matches itself (case-sensitive).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Longer patterns are refused: no path is longer (PATH_MAX), and the NFA grows with the pattern.
MAX_PATTERN_CHARS = 4096
# Memoised transitions (state set, character) -> state set; cleared when it reaches this size.
_MAX_CACHED_TRANSITIONS = 20_000

_ANY = "any"  # any character
_NOT_SLASH = "not-slash"  # any character but `/`


class GlobError(ValueError):
    """The pattern cannot be used (too long)."""


@dataclass
class _Test:
    """A consuming state: `test` is a character, `_ANY`, `_NOT_SLASH` or a `_Class`."""

    test: object
    next: int


@dataclass(frozen=True)
class _Class:
    ranges: tuple[tuple[str, str], ...]
    negated: bool

    def matches(self, char: str) -> bool:
        if char == "/":
            return False
        inside = any(low <= char <= high for low, high in self.ranges)
        return inside != self.negated


@dataclass
class _Split:
    """An epsilon state: continue in every one of `outs`."""

    outs: list[int] = field(default_factory=list)


_ACCEPT = 0


class Glob:
    """A compiled glob; `matches(name)` is True when the whole of `name` matches."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise GlobError(f"the pattern is longer than {MAX_PATTERN_CHARS} characters")
        self.pattern = pattern
        self._states: list[_Test | _Split | None] = [None]  # state 0 accepts
        try:
            sequence, _end = _parse(pattern, 0, in_braces=False)
        except IndexError:  # braces that only close inside a class, e.g. `{a,[}]`: take it literally
            sequence = list(pattern)
        self._start = self._closure([self._build_sequence(sequence, _ACCEPT)])
        self._transitions: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def matches(self, name: str) -> bool:
        current = self._start
        transitions = self._transitions
        for char in name:
            key = (current, char)
            following = transitions.get(key)
            if following is None:
                following = self._step(current, char)
                if len(transitions) >= _MAX_CACHED_TRANSITIONS:
                    transitions.clear()
                transitions[key] = following
            if not following:
                return False
            current = following
        return _ACCEPT in current

    # ----- simulation -------------------------------------------------------------------------------------

    def _step(self, current: frozenset[int], char: str) -> frozenset[int]:
        reached: list[int] = []
        for index in current:
            state = self._states[index]
            if isinstance(state, _Test) and _passes(state.test, char):
                reached.append(state.next)
        return self._closure(reached)

    def _closure(self, seeds: Iterable[int]) -> frozenset[int]:
        """The consuming states (and the accept state) reachable from `seeds` without consuming."""
        result: set[int] = set()
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            state = self._states[index]
            if isinstance(state, _Split):
                stack.extend(state.outs)
            else:
                result.add(index)
        return frozenset(result)

    # ----- construction (each piece is built in front of its continuation) -------------------------------

    def _add(self, state: _Test | _Split) -> int:
        self._states.append(state)
        return len(self._states) - 1

    def _build_sequence(self, sequence: list[object], continuation: int) -> int:
        for node in reversed(sequence):
            continuation = self._build_node(node, continuation)
        return continuation

    def _build_node(self, node: object, continuation: int) -> int:
        if isinstance(node, tuple) and node[0] == "alt":
            return self._add(_Split([self._build_sequence(branch, continuation) for branch in node[1]]))
        if node in (_STAR, _GLOBSTAR):
            # loop: either consume one more character and come back, or go on.
            loop = self._add(_Split())
            consume = self._add(_Test(_NOT_SLASH if node == _STAR else _ANY, loop))
            self._states[loop] = _Split([consume, continuation])
            return loop
        if node == _GLOBSTAR_SLASH:
            # (any run, then `/`) or nothing at all.
            slash = self._add(_Test("/", continuation))
            loop = self._add(_Split())
            consume = self._add(_Test(_ANY, loop))
            self._states[loop] = _Split([consume, slash])
            return self._add(_Split([loop, continuation]))
        if node == _ONE:
            return self._add(_Test(_NOT_SLASH, continuation))
        return self._add(_Test(node, continuation))  # a literal character or a _Class


def _passes(test: object, char: str) -> bool:
    if test is _ANY:
        return True
    if test is _NOT_SLASH:
        return char != "/"
    if isinstance(test, _Class):
        return test.matches(char)
    return test == char


# ----- parsing --------------------------------------------------------------------------------------------
# A sequence is a list of nodes: a one-character string (a literal), one of the tuples below, a _Class, or
# ("alt", [sequence, ...]).
_STAR = ("*",)
_GLOBSTAR = ("**",)
_GLOBSTAR_SLASH = ("**/",)
_ONE = ("?",)


def _parse(pattern: str, index: int, *, in_braces: bool) -> tuple[list[object], int]:
    """Parse from `index` up to the end, or (inside braces) up to the `,` or `}` ending this alternative;
    returns the sequence and the index of that delimiter."""
    out: list[object] = []
    end = len(pattern)
    while index < end:
        char = pattern[index]
        if in_braces and char in ",}":
            return out, index
        if char == "*":
            if pattern.startswith("**", index):
                index += 2
                if pattern.startswith("/", index):
                    out.append(_GLOBSTAR_SLASH)
                    index += 1
                else:
                    out.append(_GLOBSTAR)
                continue
            out.append(_STAR)
        elif char == "?":
            out.append(_ONE)
        elif char == "[":
            parsed = _parse_class(pattern, index)
            if parsed is None:
                out.append("[")
            else:
                klass, index = parsed
                out.append(klass)
        elif char == "{" and _brace_end(pattern, index) > 0:
            branches: list[list[object]] = []
            index += 1
            while True:
                branch, index = _parse(pattern, index, in_braces=True)
                branches.append(branch)
                if pattern[index] == "}":
                    break
                index += 1  # the comma
            out.append(("alt", branches))
        elif char == "\\" and index + 1 < end:
            index += 1
            out.append(pattern[index])
        else:
            out.append(char)
        index += 1
    return out, index


def _parse_class(pattern: str, start: int) -> tuple[_Class, int] | None:
    """The class opening at `start` and the index of its closing `]`, or None if it is never closed."""
    index = start + 1
    end = len(pattern)
    negated = index < end and pattern[index] in "!^"
    if negated:
        index += 1
    ranges: list[tuple[str, str]] = []
    first = True
    while index < end:
        char = pattern[index]
        if char == "]" and not first:
            return _Class(tuple(ranges), negated), index
        first = False
        if char == "\\" and index + 1 < end:
            index += 1
            char = pattern[index]
        low = char
        if index + 2 < end and pattern[index + 1] == "-" and pattern[index + 2] != "]":
            index += 2
            high = pattern[index]
            if high == "\\" and index + 1 < end:
                index += 1
                high = pattern[index]
            ranges.append((low, high))
        else:
            ranges.append((low, low))
        index += 1
    return None


def _brace_end(pattern: str, start: int) -> int:
    """Index of the `}` closing the `{` at `start`, or -1."""
    depth = 0
    index = start
    while index < len(pattern):
        if pattern[index] == "\\":
            index += 2
            continue
        if pattern[index] == "{":
            depth += 1
        elif pattern[index] == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return -1
