"""Synthetic long-context tasks: seeded generators of (prompt, gold answer) in plain ASCII (byte
tokens), scored by exact match of the greedy answer's first line. No model judges anything.

passkey (Mohtashami & Jaggi, 2023, Landmark Attention), needle-in-a-haystack single / multi-key /
multi-value and variable tracking (RULER, Hsieh et al., 2024), multi-query associative recall
(Zoology, Arora et al., 2023), needle threading (Roberts et al., 2024), segment ordering
(Ada-LEval's TSort, Wang et al., 2024), composed arithmetic chains (R-Horizon, 2025; h1, 2025).

Every sample is exactly `length` bytes as prompt + answer + "\n"; `x` is the task's second axis
(needle depth in [0, 1], or the number of segments / chained problems). Needle values follow a
colon that the haystack never contains ("is:12345"), so a small model can find them by copying
(an induction head) while multi-key variants still need the key to disambiguate.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from collections.abc import Callable

import numpy as np

from horizon.errors import ConfigError

# The classic passkey haystack (Mohtashami & Jaggi, 2023): repeated, content-free sentences.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "candle", "rocket", "garden", "silver",
         "window", "forest", "bridge", "lemon", "violet", "anchor", "marble", "falcon", "harbor", "meadow",
         "pepper", "saddle", "tunnel", "wizard", "zebra", "copper", "dragon", "island", "jungle")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One task instance: `prompt + answer + "\\n"` is exactly `length` bytes."""

    task: str
    prompt: str
    answer: str
    length: int
    x: float
    seed: int

    @property
    def text(self) -> str:
        return self.prompt + self.answer + "\n"


def score(sample: Sample, output: str) -> float:
    """1.0 if the output's first line is exactly the gold answer, else 0.0."""
    return float(output.split("\n", 1)[0] == sample.answer)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[int, int, float], Sample]  # (seed, length, x) -> Sample
    axis: str  # what x means
    default_xs: tuple[float, ...]


def _rng(name: str, seed: int, length: int, x: float) -> np.random.Generator:
    return np.random.default_rng([seed, length, round(x * 1000), sum(map(ord, name))])


def _digits(rng, n: int) -> str:
    return str(int(rng.integers(10 ** (n - 1), 10**n)))


def _word(rng, exclude=()) -> str:
    return str(rng.choice([w for w in WORDS if w not in exclude]))


def _too_short(name: str, length: int, need: int) -> ConfigError:
    return ConfigError(f"--lengths: {length} is too short for task {name!r} (needs at least {need} bytes); "
                       "pass longer lengths")


def _haystack(name: str, length: int, answer: str, question: str, needles: list[tuple[float, str]],
              header: str = "") -> str:
    """header + NOISE filler with each needle at its depth (snapped back to a sentence start) +
    question, sized so that the whole sample is exactly `length` bytes."""
    fixed = len(header) + len(question) + len(answer) + 1 + sum(len(n) for _, n in needles)
    budget = length - fixed
    if budget < 0:
        raise _too_short(name, length, fixed)
    hay = (NOISE * (budget // len(NOISE) + 1))[:budget]
    starts = [0] + [i + 2 for i in range(budget - 1) if hay[i:i + 2] == ". "]
    placed = []
    for order, (depth, text) in enumerate(needles):
        offset = round(min(max(depth, 0.0), 1.0) * budget)
        placed.append((max(s for s in starts if s <= offset), order, text))
    out, prev = [], 0
    for at, _, text in sorted(placed):
        out += [hay[prev:at], text]
        prev = at
    out.append(hay[prev:])
    prompt = header + "".join(out) + question
    assert len(prompt) + len(answer) + 1 == length
    return prompt


def _sample(name, seed, length, x, prompt, answer) -> Sample:
    return Sample(task=name, prompt=prompt, answer=answer, length=length, x=float(x), seed=seed)


# ---- needle tasks (x = depth of the queried needle) -----------------------------------------------

def passkey(seed: int, length: int, depth: float) -> Sample:
    """A 5-digit pass key hidden at `depth` in the repeated noise."""
    rng = _rng("passkey", seed, length, depth)
    key = _digits(rng, 5)
    q = "\nWhat is the pass key? The pass key is:"
    prompt = _haystack("passkey", length, key, q, [(depth, f"The pass key is:{key}. Remember it. ")])
    return _sample("passkey", seed, length, depth, prompt, key)


def _magic(key: str, value: str) -> str:
    return f"The magic number for {key} is:{value}. "


def niah_single(seed: int, length: int, depth: float) -> Sample:
    """One key-value needle (RULER niah_single): recall the 6-digit value of the named key."""
    rng = _rng("niah_single", seed, length, depth)
    key, value = _word(rng), _digits(rng, 6)
    q = f"\nWhat is the magic number for {key}? The magic number for {key} is:"
    prompt = _haystack("niah_single", length, value, q, [(depth, _magic(key, value))])
    return _sample("niah_single", seed, length, depth, prompt, value)


def niah_multikey(seed: int, length: int, depth: float, n_keys: int = 4) -> Sample:
    """n_keys needles with distinct keys at random depths; the queried one sits at `depth`."""
    rng = _rng("niah_multikey", seed, length, depth)
    keys = [str(k) for k in rng.choice(WORDS, size=n_keys, replace=False)]
    values = [_digits(rng, 6) for _ in keys]
    depths = [depth] + [float(d) for d in rng.random(n_keys - 1)]
    q = f"\nWhat is the magic number for {keys[0]}? The magic number for {keys[0]} is:"
    prompt = _haystack("niah_multikey", length, values[0], q,
                       [(d, _magic(k, v)) for d, k, v in zip(depths, keys, values)])
    return _sample("niah_multikey", seed, length, depth, prompt, values[0])


def niah_multivalue(seed: int, length: int, depth: float, n_values: int = 3) -> Sample:
    """n_values needles for one key (the first at `depth`); recall all values in text order."""
    rng = _rng("niah_multivalue", seed, length, depth)
    key = _word(rng)
    values = list(dict.fromkeys(_digits(rng, 6) for _ in range(n_values)))
    depths = [depth] + [float(d) for d in rng.random(len(values) - 1)]
    needles = [(d, _magic(key, v)) for d, v in zip(depths, values)]
    answer_len = sum(map(len, values)) + 2 * (len(values) - 1)  # ", ".join(...) in any order
    q = f"\nWhat are all the magic numbers for {key}? The magic numbers for {key} are:"
    prompt = _haystack("niah_multivalue", length, "x" * answer_len, q, needles)
    answer = ", ".join(sorted(values, key=lambda v: prompt.index(_magic(key, v))))  # order in the text
    return _sample("niah_multivalue", seed, length, depth, prompt, answer)


def variable_tracking(seed: int, length: int, depth: float, hops: int = 4) -> Sample:
    """RULER variable tracking: VAR A = 12345, then VAR B = A, ... at rising depths from `depth`;
    name every variable that holds the value, in chain order."""
    rng = _rng("variable_tracking", seed, length, depth)
    names = list(dict.fromkeys("".join(rng.choice(list(string.ascii_uppercase), 5)) for _ in range(hops)))
    value = _digits(rng, 5)
    depths = [depth] + sorted(float(d) for d in depth + (1 - depth) * rng.random(len(names) - 1))
    needles = [(depths[0], f"VAR {names[0]} = {value}. ")]
    needles += [(d, f"VAR {b} = {a}. ") for d, a, b in zip(depths[1:], names, names[1:])]
    answer = " ".join(names)
    q = f"\nFind all variables that are assigned the value {value}. Answer: "
    prompt = _haystack("variable_tracking", length, answer, q, needles)
    return _sample("variable_tracking", seed, length, depth, prompt, answer)


def mqar(seed: int, length: int, depth: float, n_queries: int = 3) -> Sample:
    """Multi-query associative recall: the context is key:value pairs (3 letters : 2 digits); the
    queried pairs sit around `depth`; answer their values in query order."""
    rng = _rng("mqar", seed, length, depth)
    q_len = len("\nquery ") + 4 * n_queries + len("\nanswer ")
    ans_len = 3 * n_queries - 1
    n_pairs = (length - q_len - ans_len - 1) // 7
    if n_pairs < n_queries:
        raise _too_short("mqar", length, q_len + ans_len + 1 + 7 * n_queries)
    keys, seen = [], set()
    while len(keys) < n_pairs:
        k = "".join(rng.choice(list(string.ascii_lowercase), 3))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [f"{int(v):02d}" for v in rng.integers(0, 100, size=n_pairs)]
    centre = round(depth * (n_pairs - n_queries))
    queried = [centre + int(i) for i in rng.permutation(n_queries)]
    pairs = "".join(f"{k}:{v} " for k, v in zip(keys, values))
    pad = length - q_len - ans_len - 1 - len(pairs)
    prompt = pairs + " " * pad + "\nquery " + " ".join(keys[i] for i in queried) + " \nanswer "
    answer = " ".join(values[i] for i in queried)
    return _sample("mqar", seed, length, depth, prompt, answer)


def needle_threading(seed: int, length: int, depth: float, hops: int = 3) -> Sample:
    """Needle threading: among random `key -> value` pairs of 6 hex digits, a thread k0 -> k1 ->
    ... -> v whose first link sits at `depth`; follow it from k0 and give the final value."""
    rng = _rng("needle_threading", seed, length, depth)
    hexes = list(dict.fromkeys("".join(rng.choice(list("0123456789abcdef"), 6)) for _ in range(4 * hops + 8)))
    thread = hexes[:hops + 1]
    assert len(thread) == hops + 1
    links = [f"{a} -> {b}\n" for a, b in itertools.pairwise(thread)]
    q = f"\nFollow the thread from {thread[0]}. The final value is "
    answer = thread[-1]
    fixed = sum(map(len, links)) + len(q) + len(answer) + 1
    n_fill = (length - fixed) // 17  # a pair line "abcdef -> 012345\n" is 17 bytes
    if n_fill < 0:
        raise _too_short("needle_threading", length, fixed)
    pool = set(thread)
    fill = []
    while len(fill) < n_fill:  # distractor pairs that never touch the thread
        a, b = ("".join(rng.choice(list("0123456789abcdef"), 6)) for _ in range(2))
        if a not in pool and b not in pool:
            fill.append(f"{a} -> {b}\n")
    at = [round(depth * n_fill)] + [int(i) for i in rng.integers(0, n_fill + 1, size=hops - 1)]
    lines = list(fill)
    for pos, link in sorted(zip(at, links), key=lambda p: -p[0]):  # insert from the back
        lines.insert(pos, link)
    pad = length - fixed - 17 * n_fill
    prompt = " " * pad + "".join(lines) + q
    return _sample("needle_threading", seed, length, depth, prompt, answer)


# ---- ordering and composition (x = number of segments / problems) -----------------------------------

def segment_ordering(seed: int, length: int, n_segments: float = 4) -> Sample:
    """TSort: a counting sequence cut into k consecutive segments, shown shuffled; answer the
    segment labels in the original order."""
    k = int(n_segments)
    rng = _rng("segment_ordering", seed, length, k)
    header = "Put the segments in order.\n"
    q = "Order: "
    answer_len = 2 * k - 1
    budget = length - len(header) - len(q) - answer_len - 1 - sum(len(f"[{i + 1}] \n") for i in range(k))
    seg_len = budget // k if k >= 2 else -1
    if seg_len < 4:
        raise _too_short("segment_ordering", length, length - budget + 4 * max(k, 2))
    start = int(rng.integers(100, 900))
    text = ""
    n = start
    while len(text) < seg_len * k:
        text += f"{n} "
        n += 1
    segments = [text[i * seg_len:(i + 1) * seg_len] for i in range(k)]
    perm = [int(i) for i in rng.permutation(k)]  # shown position j holds original segment perm[j]
    shown = "".join(f"[{j + 1}] {segments[perm[j]]}\n" for j in range(k))
    label_of = {orig: j + 1 for j, orig in enumerate(perm)}
    answer = " ".join(str(label_of[i]) for i in range(k))
    pad = budget - seg_len * k
    prompt = header + shown + " " * pad + q
    return _sample("segment_ordering", seed, length, k, prompt, answer)


def arithmetic_chain(seed: int, length: int, chain: float = 4) -> Sample:
    """Composed problems spread through the noise: problem i+1 uses the answer of problem i
    (Let b = a + 7.); the final variable's value is the answer, right only if every link is."""
    k = int(chain)
    rng = _rng("arithmetic_chain", seed, length, k)
    names = list(string.ascii_lowercase[:k]) if k <= 26 else [f"v{i}" for i in range(k)]
    value = int(rng.integers(10, 90))
    needles = [(0.0, f"Let {names[0]} = {value}. ")]
    for i in range(1, k):
        n = int(rng.integers(1, 10))
        op = "+" if value + n < 100 and (value - n < 0 or rng.random() < 0.5) else "-"
        value = value + n if op == "+" else value - n
        needles.append((i / k, f"Let {names[i]} = {names[i - 1]} {op} {n}. "))
    q = f"\nWhat is {names[-1]}? {names[-1]} = "
    prompt = _haystack("arithmetic_chain", length, str(value), q, needles)
    return _sample("arithmetic_chain", seed, length, k, prompt, str(value))


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("passkey", passkey, "depth", (0.1, 0.5, 0.9)),
    Task("niah_single", niah_single, "depth", (0.1, 0.5, 0.9)),
    Task("niah_multikey", niah_multikey, "depth", (0.1, 0.5, 0.9)),
    Task("niah_multivalue", niah_multivalue, "depth", (0.1, 0.5, 0.9)),
    Task("variable_tracking", variable_tracking, "depth", (0.1, 0.5, 0.9)),
    Task("mqar", mqar, "depth", (0.1, 0.5, 0.9)),
    Task("needle_threading", needle_threading, "depth", (0.1, 0.5, 0.9)),
    Task("segment_ordering", segment_ordering, "segments", (2, 3, 4)),
    Task("arithmetic_chain", arithmetic_chain, "chain length", (1, 2, 4, 8)),
]}


def get_task(name: str) -> Task:
    """The task registered under `name`; ConfigError listing the known ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"--task: unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
