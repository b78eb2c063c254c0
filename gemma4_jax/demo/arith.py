"""Procedural grade-school arithmetic word problems in GSM8K's format (the demo model's data).

Owns the problem templates and a seeded generator. Each problem is a dict like a GSM8K record:
`question`, and `answer` = worked steps (one per line, each showing its calculation) followed by
`#### <number>`. Numbers stay small (sums under a few hundred, products of a one-digit factor) so a
model of about a million parameters learns the arithmetic within minutes on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava", "Noah", "Eva",
         "Omar", "Nina", "Carlos", "Julia", "Ken", "Sara"]
PRONOUN = {"Tom": "he", "Ben": "he", "Sam": "he", "Jack": "he", "Leo": "he", "Max": "he", "Noah": "he",
           "Omar": "he", "Carlos": "he", "Ken": "he"}
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "eggs", "flowers",
         "stamps", "candies", "balloons", "oranges", "toys", "coins"]
CONTAINERS = ["boxes", "bags", "packs", "baskets", "jars"]


def _pron(name: str) -> str:
    return PRONOUN.get(name, "she")


def _two_names(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(NAMES, 2)
    return a, b


# Each template draws its numbers and returns (question, [steps], answer). Steps show the calculation
# as `a op b = c` so the model computes each result right after writing its operands.
def _buy_more(r: random.Random):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 60), r.randint(2, 40)
    q = f"{n} has {a} {it}. {_pron(n).capitalize()} buys {b} more {it}. How many {it} does {n} have now?"
    return q, [f"{n} has {a} + {b} = {a + b} {it} now."], a + b


def _buy_then_give(r: random.Random):
    n, f = _two_names(r)
    it = r.choice(ITEMS)
    a, b = r.randint(5, 60), r.randint(2, 40)
    c = r.randint(1, a + b - 1)
    q = (f"{n} has {a} {it}. {_pron(n).capitalize()} buys {b} more and then gives {c} to {f}. "
         f"How many {it} does {n} have left?")
    s = a + b
    steps = [f"After buying, {n} has {a} + {b} = {s} {it}.",
             f"After giving {c} away, {n} has {s} - {c} = {s - c} {it}."]
    return q, steps, s - c


def _boxes(r: random.Random):
    n, it, box = r.choice(NAMES), r.choice(ITEMS), r.choice(CONTAINERS)
    a, b = r.randint(2, 9), r.randint(2, 12)
    q = f"{n} buys {a} {box} of {it}. Each of the {box} holds {b} {it}. How many {it} does {n} buy?"
    return q, [f"{n} buys {a} * {b} = {a * b} {it}."], a * b


def _change(r: random.Random):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = r.choice([x for x in (20, 50, 100) if x > a * b])
    q = f"{n} buys {a} {it} for ${b} each and pays with a ${c} bill. How much change does {_pron(n)} get?"
    p = a * b
    return q, [f"The {it} cost {a} * {b} = ${p}.", f"The change is {c} - {p} = ${c - p}."], c - p


def _share(r: random.Random):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 12)
    q = f"{n} shares {a * b} {it} equally among {a} friends. How many {it} does each friend get?"
    return q, [f"Each friend gets {a * b} / {a} = {b} {it}."], b


def _more_than(r: random.Random):
    n, f = _two_names(r)
    it = r.choice(ITEMS)
    a, b = r.randint(2, 50), r.randint(2, 30)
    c = a + b
    q = f"{n} has {a} {it}. {f} has {b} more {it} than {n}. How many {it} do they have together?"
    return q, [f"{f} has {a} + {b} = {c} {it}.", f"Together they have {a} + {c} = {a + c} {it}."], a + c


def _times_as_many(r: random.Random):
    n, f = _two_names(r)
    it = r.choice(ITEMS)
    a, k = r.randint(2, 12), r.randint(2, 9)
    p = a * k
    q = f"{n} has {a} {it}. {f} has {k} times as many {it}. How many more {it} does {f} have than {n}?"
    return q, [f"{f} has {a} * {k} = {p} {it}.", f"{f} has {p} - {a} = {p - a} more {it}."], p - a


def _days(r: random.Random):
    n = r.choice(NAMES)
    a, d, c = r.randint(2, 12), r.randint(2, 9), r.randint(2, 40)
    p = a * d
    q = (f"{n} reads {a} pages every day for {d} days. Then {_pron(n)} reads {c} more pages. "
         f"How many pages does {n} read in all?")
    return q, [f"In {d} days {n} reads {a} * {d} = {p} pages.", f"In all {n} reads {p} + {c} = {p + c} pages."], p + c


def _spend(r: random.Random):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    m, a, b = r.randint(40, 99), r.randint(2, 9), r.randint(2, 4)
    p = a * b
    q = f"{n} has ${m}. {_pron(n).capitalize()} buys {b} {it} for ${a} each. How much money does {n} have left?"
    return q, [f"The {it} cost {b} * {a} = ${p}.", f"{n} has {m} - {p} = ${m - p} left."], m - p


TEMPLATES: tuple[Callable[[random.Random], tuple[str, list[str], int]], ...] = (
    _buy_more, _buy_then_give, _boxes, _change, _share, _more_than, _times_as_many, _days, _spend,
)


def make_problem(r: random.Random) -> dict:
    """One problem: {'question', 'answer' (steps + '#### n'), 'number'}."""
    question, steps, result = r.choice(TEMPLATES)(r)
    return {"question": question, "answer": "\n".join([*steps, f"#### {result}"]), "number": result}


def problems(seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[dict]:
    """An endless, seeded stream of problems whose questions are not in `exclude`."""
    r = random.Random(seed)
    while True:
        p = make_problem(r)
        if p["question"] not in exclude:
            yield p


def held_out(seed: int, n: int) -> list[dict]:
    """`n` distinct problems (a test set; exclude its questions from training)."""
    seen, out = set(), []
    for p in problems(seed):
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
        if len(out) == n:
            return out
    raise AssertionError("unreachable")
