"""The zoo's task language: three families of in-context tasks written as words over a fixed vocabulary.

Every sequence is ``<bos> CONTEXT QUERY_1 ANSWER_1 ; QUERY_2 ANSWER_2 ; ...`` (words separated by spaces; the
tokenizer is word-level, so one word = one token). Answers are scored by exact match of all their tokens.

* ``function`` (function induction): a rule ``y = a·x + b mod p`` is drawn per sequence (``a`` from
  ``slopes``, ``b`` uniform in ``0..p-1``) and shown by ``k`` demonstrations ``x -> y ;``. A fraction ``noise``
  of the demonstrations carries a wrong ``y``, so a single demonstration is not enough: the model has to
  combine (vote over) several. Query ``x`` values never occur among the demonstrations' ``x``, so an answer is
  never a copy of a demonstration answer. Default ``p=11``, ``slopes=(1,)`` (a shift), ``noise=0.1``; the
  affine variant ``slopes=(1, p-1)`` or ``range(1, p)`` is harder (docs/zoo.md). Example (``p=13``,
  ``y = x + 4``)::

      3 -> 7 ; 10 -> 1 ; 5 -> 2 ; 0 -> 4 ;   6 -> 10 ;      (5 -> 2 is a noisy demonstration)

* ``facts`` (fact recall): ``k`` distinct keys bound to values, ``k3 v7 ;``, then questions in the same shape
  (``k3`` → ``v7``): the answer is in the context (induction / copying)::

      k3 v7 ; k12 v0 ; k5 v7 ;   k12 v0 ; k3 v7 ;

* ``instruction`` (a system prompt): one instruction line, then list → list pairs decided by the instruction
  alone (digits ``0..9``; ``sort``, ``reverse``, ``rotate`` = move the first element last, ``caesar n`` = add
  ``n`` mod 10 to each element)::

      mode: caesar 3 ;   4 1 9 => 7 4 2 ; 0 5 => 3 8 ;

``chance(family)`` is the accuracy of the best guess without context: ``1/p`` for ``function``,
``1/num_values`` for ``facts``, ``1/len(modes)`` (always answering with the most frequent mode) for
``instruction``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FAMILIES", "Example", "FunctionTask", "FactsTask", "InstructionTask", "MODES", "vocabulary",
           "apply_mode", "make_task", "CopyTask", "LagTask"]

FAMILIES = ("function", "facts", "instruction")
MODES = ("sort", "reverse", "rotate", "caesar 1", "caesar 2", "caesar 3", "caesar 4", "caesar 5")
NUMBERS = 32  # number words "0".."31" (function values, list digits, caesar shifts)
KEYS = 32
VALUES = 32
_KEY_VALUE_WORDS = tuple(f"k{i}" for i in range(KEYS)) + tuple(f"v{i}" for i in range(VALUES))  # copy / lag words


def vocabulary() -> list[str]:
    """The fixed word list: specials first (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3)."""
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "->", "=>", ";", "mode:", "sort", "reverse", "rotate", "caesar"]
    words += [str(i) for i in range(NUMBERS)]
    words += [f"k{i}" for i in range(KEYS)] + [f"v{i}" for i in range(VALUES)]
    return words


@dataclass(frozen=True)
class Example:
    """One sequence: ``context`` words, then ``pairs`` of (query, answer) strings.

    ``demos`` are the (query, answer, is_target) segments inside the context whose answers are predictable
    from what precedes them (used as extra training targets; empty for ``facts``). ``shots`` is ``k``.
    """

    family: str
    shots: int
    context: str
    pairs: list[tuple[str, str]]
    head: str = ""  # context words before the demonstrations (instruction line); "" otherwise
    demos: list[tuple[str, str, bool]] = field(default_factory=list)

    def text(self, *, with_context: bool = True) -> str:
        """The full text (context + queries with answers), without ``<bos>``."""
        parts = [self.context] if with_context and self.context else []
        parts += [f"{q} {a} ;" for q, a in self.pairs]
        return " ".join(parts)

    def segments(self, *, with_context: bool = True, demo_targets: bool = True) -> list[tuple[str, bool]]:
        """The text as (words, is_target) pieces; targets are answers (and clean demonstration answers)."""
        segs: list[tuple[str, bool]] = []
        if with_context:
            if self.demos:
                if self.head:
                    segs.append((self.head, False))
                for q, a, clean in self.demos:
                    segs += [(q, False), (a, demo_targets and clean), (";", False)]
            elif self.context:
                segs.append((self.context, False))
        for q, a in self.pairs:
            segs += [(q, False), (a, True), (";", False)]
        return segs


@dataclass(frozen=True, kw_only=True)
class FunctionTask:
    """``y = a·x + b mod p`` with ``a`` in ``slopes``; each demonstration is wrong with probability ``noise``."""

    p: int = 11
    slopes: tuple[int, ...] = (1,)
    noise: float = 0.1
    family: str = "function"

    def chance(self) -> float:
        return 1.0 / self.p

    def sample(self, rng: np.random.Generator, shots: int, n_queries: int = 1) -> Example:
        a, b = int(rng.choice(self.slopes)), int(rng.integers(self.p))
        qx = rng.choice(self.p, size=min(n_queries, self.p - 1), replace=False)
        pool = np.setdiff1d(np.arange(self.p), qx)
        demos = []
        for x in rng.choice(pool, size=shots, replace=True):
            y, clean = (a * int(x) + b) % self.p, True
            if rng.random() < self.noise:
                y, clean = (y + int(rng.integers(1, self.p))) % self.p, False
            demos.append((f"{int(x)} ->", str(y), clean))
        context = " ".join(f"{q} {a_} ;" for q, a_, _ in demos)
        pairs = [(f"{int(x)} ->", str((a * int(x) + b) % self.p)) for x in qx]
        return Example(family=self.family, shots=shots, context=context, pairs=pairs, demos=demos)


@dataclass(frozen=True, kw_only=True)
class FactsTask:
    """``k`` facts ``kI vJ ;`` (distinct keys, values with repetition), questions ``kI`` → ``vJ``."""

    num_keys: int = KEYS
    num_values: int = VALUES
    family: str = "facts"

    def chance(self) -> float:
        return 1.0 / self.num_values

    def sample(self, rng: np.random.Generator, shots: int, n_queries: int = 1) -> Example:
        shots = max(1, min(shots, self.num_keys))
        keys = rng.choice(self.num_keys, size=shots, replace=False)
        vals = rng.integers(self.num_values, size=shots)
        context = " ".join(f"k{k} v{v} ;" for k, v in zip(keys, vals, strict=True))
        asked = rng.choice(shots, size=min(n_queries, shots), replace=False)
        pairs = [(f"k{keys[i]}", f"v{vals[i]}") for i in asked]
        return Example(family=self.family, shots=shots, context=context, pairs=pairs)


def apply_mode(mode: str, xs: list[int]) -> list[int]:
    """The answer of instruction ``mode`` on the digit list ``xs``."""
    if mode == "sort":
        return sorted(xs)
    if mode == "reverse":
        return xs[::-1]
    if mode == "rotate":
        return xs[1:] + xs[:1]
    if mode.startswith("caesar "):
        n = int(mode.split()[1])
        return [(x + n) % 10 for x in xs]
    raise ValueError(f"unknown mode {mode!r}")


@dataclass(frozen=True, kw_only=True)
class InstructionTask:
    """``mode: M ;`` then ``k`` demonstrations and the queries, digit lists of length ``min_len..max_len``."""

    modes: tuple[str, ...] = MODES
    min_len: int = 2
    max_len: int = 4
    family: str = "instruction"

    def chance(self) -> float:
        return 1.0 / len(self.modes)

    def _pair(self, rng: np.random.Generator, mode: str) -> tuple[str, str]:
        xs = [int(v) for v in rng.integers(10, size=int(rng.integers(self.min_len, self.max_len + 1)))]
        return " ".join(map(str, xs)) + " =>", " ".join(map(str, apply_mode(mode, xs)))

    def sample(self, rng: np.random.Generator, shots: int, n_queries: int = 1) -> Example:
        mode = self.modes[int(rng.integers(len(self.modes)))]
        head = f"mode: {mode} ;"
        demos = [(*self._pair(rng, mode), True) for _ in range(shots)]
        context = " ".join([head] + [f"{q} {a} ;" for q, a, _ in demos])
        pairs = [self._pair(rng, mode) for _ in range(n_queries)]
        return Example(family=self.family, shots=shots, context=context, pairs=pairs, head=head, demos=demos)


@dataclass(frozen=True, kw_only=True)
class CopyTask:
    """Training-only warm-up: a random word sequence, ``;``, then the same sequence again (every word of the
    repeat after the first is an induction target: find the earlier occurrence, copy what followed it).
    Words are the keys and values of ``facts``, so the copy mechanism is the one fact recall needs."""

    min_len: int = 6
    max_len: int = 48
    family: str = "copy"

    def chance(self) -> float:
        return 1.0 / (KEYS + VALUES)

    def sample(self, rng: np.random.Generator, shots: int, n_queries: int = 1) -> Example:
        n = int(rng.integers(self.min_len, self.max_len + 1))
        words = _KEY_VALUE_WORDS
        seq = [words[i] for i in rng.integers(len(words), size=n)]
        return Example(family=self.family, shots=n, context=" ".join(seq) + " ;",
                       pairs=[(seq[0], " ".join(seq[1:]))])


@dataclass(frozen=True, kw_only=True)
class LagTask:
    """Training-only warm-up for learned positions (GPT-2): groups ``w1 … wm w(m-1) ;`` of m ∈ [2, 4] random
    words; the repeated word before the last is the target. Predicting it from ``wm`` needs attention to the
    previous token, a one-layer circuit with a direct gradient (the copy task's induction needs that
    previous-token head *and* a second head on top of it: a saddle a learned-position model sits on, docs/zoo.md).
    The random m moves the groups' phase, so absolute positions cannot stand in for "the previous token"."""

    family: str = "lag"

    def chance(self) -> float:
        return 1.0 / (KEYS + VALUES)

    def sample(self, rng: np.random.Generator, shots: int, n_queries: int = 16) -> Example:
        words = _KEY_VALUE_WORDS
        pairs = []
        for _ in range(max(1, n_queries)):
            group = [words[i] for i in rng.integers(len(words), size=int(rng.integers(2, 5)))]
            pairs.append((" ".join(group), group[-2]))
        return Example(family=self.family, shots=0, context="", pairs=pairs)


def make_task(family: str) -> FunctionTask | FactsTask | InstructionTask:
    """The default task object of a family."""
    tasks = {"function": FunctionTask, "facts": FactsTask, "instruction": InstructionTask}
    if family not in tasks:
        from .._errors import ContextPatchError

        raise ContextPatchError(f"unknown task family {family!r}; families: {', '.join(FAMILIES)}")
    return tasks[family]()
