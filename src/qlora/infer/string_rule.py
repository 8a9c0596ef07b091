"""Several rules on one string (``pattern``, ``format``, ``minLength``/``maxLength``) as one automaton.

Each rule alone is checked exactly on every prefix, but together they are not checked by
checking each: a prefix may lead on to a match of each and to no string all accept (``^a+$``
beside ``format: date``; ``^abc`` beside ``maxLength: 2``). So the rules are combined once:

- the patterns' NFAs (:class:`~qlora.infer.regex.Regex`) are multiplied into one epsilon-free
  automaton over code points, of the state tuples reachable from the start, keeping only
  those from which every pattern accepts at once;
- the length bounds are kept as, for each state, the lengths its completions can have (a
  bitset). Only lengths up to ``minLength`` + the number of states matter: a longer accepting
  path repeats a state, and dropping that loop (at most that many characters) keeps it at
  least as long as needed and within any wider window.

A prefix's state is the set of automaton states it reaches, filtered to those with a
completion of an allowed length, and its length: empty means no allowed string goes on this
way, so every state decoding reaches has a completion. Combinations that would grow past
:data:`MAX_STATES` states, :data:`MAX_EDGES` transitions or :data:`MAX_WORK` steps counting
lengths raise :class:`~qlora.infer.regex.PatternError` (the schema part is then unenforced).
"""

from __future__ import annotations

import math
from bisect import bisect_right

from .regex import PatternError, Ranges, Regex

MAX_STATES = 20_000  # state tuples of the product
MAX_EDGES = 400_000  # transitions (targets summed over states)
MAX_WORK = 20_000_000  # transitions visited while counting completion lengths

State = tuple[frozenset[int], int]  # automaton states reached, code points read


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _useful(regex: Regex, items: frozenset[int]) -> list[int]:
    """The items of a state set that matter once epsilon moves are done: those that read a character, and the
    accepting ones."""
    return sorted(i for i in items if i >> 1 == regex.accept or (not i & 1 and regex.chars[i >> 1]))


class StringRule:
    """Patterns and length bounds on one string, checked together (see the module docstring)."""

    def __init__(self, regexes: list[Regex], min_length: int, max_length: float, source: str) -> None:
        """``source``: the rules in words, for messages (``"pattern '^a' and maxLength 3"``)."""
        self.source, self.regexes, self.min_length, self.max_length = source, regexes, min_length, max_length
        self.edges: list[tuple[Ranges, tuple[int, ...]]] = []
        self.accepting: set[int] = set()
        index: dict[tuple[int, ...], int] = {}
        todo: list[tuple[int, ...]] = []

        def add(key: tuple[int, ...]) -> int:
            if key not in index:
                if len(index) >= MAX_STATES:
                    raise PatternError(f"{source} combine into more than {MAX_STATES} automaton states")
                index[key] = len(index)
                todo.append(key)
            return index[key]

        def products(sets: list[list[int]]) -> list[tuple[int, ...]]:
            out: list[tuple[int, ...]] = [()]
            for items in sets:
                out = [k + (i,) for k in out for i in items]
            return out

        starts = [add(k) for k in products([_useful(r, r.start) for r in regexes])]
        edges: dict[int, tuple[Ranges, tuple[int, ...]]] = {}
        count = 0
        while todo:
            key = todo.pop()
            q = index[key]
            if all(i >> 1 == r.accept for i, r in zip(key, regexes)):
                self.accepting.add(q)
            if any(i & 1 or not r.chars[i >> 1] for i, r in zip(key, regexes)):
                continue  # some pattern is at its end, or past a '$': no character goes on
            ranges, parts = None, []
            for i, r in zip(key, regexes):
                own, t = r.chars[i >> 1][0]
                ranges = own if ranges is None else _intersect(ranges, own)
                parts.append(_useful(r, r.target(t)))
            if not ranges:
                continue
            targets = products(parts)
            count += len(targets)
            if count > MAX_EDGES:
                raise PatternError(f"{source} combine into more than {MAX_EDGES} automaton transitions")
            edges[q] = (ranges, tuple(add(k) for k in targets))
        live = self._reaching(len(index), edges)
        self.edges = [(edges[q][0], tuple(t for t in edges[q][1] if t in live)) if q in edges and q in live
                      else ((), ()) for q in range(len(index))]
        self.masks = self._lengths(live) if min_length or max_length != math.inf else None
        self.start = self._viable(frozenset(q for q in starts if q in live), 0)

    def _reaching(self, size: int, edges: dict) -> set[int]:
        """The states from which an accepting one can be reached."""
        back: list[list[int]] = [[] for _ in range(size)]
        for q, (_, targets) in edges.items():
            for t in targets:
                back[t].append(q)
        seen, todo = set(self.accepting), list(self.accepting)
        while todo:
            for p in back[todo.pop()]:
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    def _lengths(self, live: set[int]) -> list[int]:
        """Per state, the bitset of the lengths (up to the last that matters) of its accepting paths."""
        top = min(self.max_length, self.min_length + len(live))
        back: dict[int, list[int]] = {}
        for q in live:
            for t in self.edges[q][1]:
                back.setdefault(t, []).append(q)
        work = int(top) * sum(len(v) for v in back.values())
        if work > MAX_WORK:
            raise PatternError(f"{self.source}: counting the lengths of completions would take {work} steps (at most "
                               f"{MAX_WORK}); lower minLength/maxLength or simplify the pattern")
        masks = [0] * len(self.edges)
        layer = set(self.accepting)
        for k in range(int(top) + 1):
            for q in layer:
                masks[q] |= 1 << k
            layer = {p for t in layer for p in back.get(t, ())}
            if not layer:
                break
        return masks

    def _window(self, n: int) -> int:
        """The completion lengths allowed after ``n`` code points (lengths past ``minLength`` + states are never
        needed: see the module docstring), as a bitset."""
        low = max(0, self.min_length - n)
        high = low + len(self.edges) if self.max_length == math.inf else min(self.max_length - n,
                                                                              low + len(self.edges))
        return 0 if high < low else ((1 << (int(high) + 1)) - 1) ^ ((1 << low) - 1)

    def _viable(self, states: frozenset[int] | set[int], n: int) -> State | None:
        if self.masks is not None:
            if n > self.max_length:
                return None
            if self.max_length == math.inf:
                n = min(n, self.min_length)  # past minLength, every length allows the same completions
            window = self._window(n)
            states = [q for q in states if self.masks[q] & window]
        return (frozenset(states), n) if states else None

    def step(self, state: State, code: int) -> State | None:
        """The state after the character ``code`` (None: no allowed string goes on this way)."""
        out: set[int] = set()
        for q in state[0]:
            ranges, targets = self.edges[q]
            k = bisect_right(ranges, (code, 0x110000)) - 1
            if k >= 0 and ranges[k][0] <= code <= ranges[k][1]:
                out.update(targets)
        return self._viable(out, state[1] + 1)

    def any_in(self, state: State, low: int, high: int) -> bool:
        """Whether some character in ``low..high`` leads on to an allowed string."""
        for q in state[0]:
            ranges, targets = self.edges[q]
            if any(a <= high and low <= b for a, b in ranges) and self._viable(targets, state[1] + 1):
                return True
        return False

    def accepts(self, state: State) -> bool:
        return self.min_length <= state[1] <= self.max_length and not self.accepting.isdisjoint(state[0])

    def matches(self, text: str) -> bool:
        """Whether the whole ``text`` is allowed."""
        state = self.start
        for ch in text:
            if state is None:
                return False
            state = self.step(state, ord(ch))
        return state is not None and self.accepts(state)
