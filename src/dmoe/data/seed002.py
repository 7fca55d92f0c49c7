"""Seed 002's five capability datasets, with answers checked by construction.

    dmoe data generate --set seed002 --out examples/seed002/data --seed 0

Per domain (``math``, ``reasoning``, ``code``, ``knowledge``, ``conversation``): a training
file of Alpaca rows and held-out questions that carry a ``check`` for ``dmoe bench --check``.
Training and held-out share no template and no item: each domain has two disjoint template
sets, and the number ranges, puzzle names, function tasks and knowledge-table rows are split
too (``tests/test_seed002_data.py`` checks it).

  math          arithmetic with carries, multi-step word problems, linear equations: the
                answer is computed, the worked solution ends in "Answer: N"
  code          small Python functions; the held-out ones carry unit tests
  reasoning     syllogisms, ordering puzzles, number sequences: one checkable answer, "Answer: X"
  knowledge     the table in ``facts.py`` (capitals, element symbols, planets, SI units, dates),
                each answer naming its source
  conversation  greetings, thanks, small talk: short, polite replies without numbers
                (the ``form`` rule of ``evals/checks.py``)

The held-out set also has off-domain questions (``domain: none``: word forms, translation),
for ``auto`` against the bare base. Math has half again as many training rows as the others:
its worked solutions (products, division by trial multiples) have the most steps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from dmoe.data import facts
from dmoe.data.formats import DatasetError
from dmoe.io import atomic_write_text

DOMAINS = ("math", "reasoning", "code", "knowledge", "conversation")
Row = dict  # an Alpaca row {"instruction", "output"}, or a held-out row {"question", "domain", "check"}


def _distinct(n: int, make: Callable[[], tuple[str, str]]) -> list[Row]:
    """Up to ``n`` rows with distinct questions from ``make`` (bounded: 20 tries a row)."""
    rows: dict[str, str] = {}
    for _ in range(n * 20):
        if len(rows) >= n:
            break
        q, a = make()
        rows.setdefault(q, a)
    return [{"instruction": q, "output": a} for q, a in rows.items()]


# ------------------------------------------------------------------ math
PLACES = ("units", "tens", "hundreds", "thousands", "ten-thousands")


def _add(a: int, b: int) -> str:
    """Column addition, one column a line, carries written out: a small model can follow digits
    where it cannot recall a four-digit sum."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry, digits = [], 0, []
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        lines.append(f"{PLACES[i]}: {x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}, write {total % 10}"
                     + (", carry 1" if total >= 10 else ""))
        digits.append(str(total % 10))
        carry = total // 10
    if carry:
        lines.append(f"{PLACES[len(digits)]}: carry 1, write 1")
        digits.append("1")
    result = "".join(reversed(digits))
    assert int(result) == a + b
    return f"{a} + {b}, column by column:\n" + "\n".join(lines) + f"\nSo {a} + {b} = {result}.\nAnswer: {result}"


def _sub(a: int, b: int) -> str:
    """Column subtraction with borrows written out (a >= b)."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, borrow, digits = [], 0, []
    for i in range(len(xs)):
        d, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        x = d - borrow
        head = f"{PLACES[i]}: {d} - 1 borrowed = {x}; " if borrow else f"{PLACES[i]}: "
        if x < y:
            lines.append(f"{head}{x} < {y}, borrow ten: {x + 10} - {y} = {x + 10 - y}")
            digits.append(str(x + 10 - y))
            borrow = 1
        else:
            lines.append(f"{head}{x} - {y} = {x - y}")
            digits.append(str(x - y))
            borrow = 0
    result = str(int("".join(reversed(digits))))
    assert int(result) == a - b
    return f"{a} - {b}, column by column:\n" + "\n".join(lines) + f"\nSo {a} - {b} = {result}.\nAnswer: {result}"


# Many wordings of each operation, so the column procedure attaches to the operation rather than
# to one phrasing (the first expert did not carry it over to unseen wordings). The held-out
# wordings ("Compute the sum of", "Multiply A by B", "Find x if") are none of these.
ADD_Q = ["What is {a} + {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?", "Calculate {a} plus {b}.",
         "{a} + {b} = ?", "How much is {a} plus {b}?", "Work out {a} + {b}.", "What is the total of {a} and {b}?",
         "Please add {a} and {b}.", "Find {a} + {b}."]
SUB_Q = ["What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?", "Calculate {a} - {b}.",
         "{a} - {b} = ?", "How much is left when you take {b} from {a}?", "Work out {a} minus {b}.",
         "What is the difference between {a} and {b}?"]
MUL_Q = ["What is {a} times {b}?", "Calculate {a} x {b}.", "What is the product of {a} and {b}?", "{a} x {b} = ?",
         "How much is {a} times {b}?", "Work out {a} x {b}.", "What do you get when you multiply {a} and {b}?"]
EQ_Q = ["Solve for x: {a}x + {b} = {c}", "What is x when {a}x + {b} = {c}?", "If {a}x + {b} = {c}, what is x?",
        "Solve {a}x + {b} = {c} for x.", "Solve for x: {c} = {a}x + {b}", "What is x, given {c} = {a}x + {b}?",
        "{c} = {a}x + {b}. What is x?"]


def _times_digit(a: int, d: int) -> str:
    """``a x d`` for one digit ``d``, place by place: "198 x 6 = 600 + 540 + 48 = 1188"."""
    parts = [int(ch) * 10 ** i * d for i, ch in enumerate(str(a)[::-1]) if ch != "0"][::-1]
    assert sum(parts) == a * d
    return f"{a} x {d} = " + (" + ".join(map(str, parts)) + " = " if len(parts) > 1 else "") + str(a * d)


def _mul(a: int, b: int) -> str:
    """``a x b`` for a two-digit ``b``: two partial products, then column addition."""
    tens, units = b // 10, b % 10
    lines = [f"{a} x {b}: split {b} into {tens * 10} + {units}.",
             f"{_times_digit(a, tens)}, so {a} x {tens * 10} = {a * tens * 10}."]
    if not units:
        return "\n".join(lines) + f"\nAnswer: {a * b}"
    lines.append(f"{_times_digit(a, units)}.")
    total = _add(a * tens * 10, a * units).rsplit("\nAnswer:", 1)[0]
    return "\n".join(lines) + "\n" + total + f"\nSo {a} x {b} = {a * b}.\nAnswer: {a * b}"


def _solve(a: int, b: int, x: int) -> str:
    """``a*x + b = c`` solved: subtract, then divide by trial multiples (tens, then units)."""
    c, n = a * x + b, a * x
    lines = [f"Subtract {b} from both sides: {c} - {b} = {n}, so {a}x = {n}.", f"Divide {n} by {a}:"]
    tens = x // 10 * 10
    if tens:
        lines.append(f"{a} x {tens} = {a * tens}, and {n} - {a * tens} = {n - a * tens} is left.")
    lines.append(f"{a} x {x - tens} = {a * (x - tens)}, nothing is left.")
    lines.append(f"So x = {tens} + {x - tens} = {x}." if tens else f"So x = {x}.")
    return "\n".join(lines) + f"\nAnswer: {x}"


# Word problems: groups of equal size, then some taken away or added. Stories and wordings of
# training only (the held-out set asks about boxes of apples, in its own words).
STORIES = [
    ("A shelf has {g} rows of {m} books. {k} books are taken away. How many books are on the shelf now?", -1),
    ("{name} packs {g} bags with {m} marbles in every bag, then loses {k} marbles. How many marbles are left?", -1),
    ("A baker fills {g} trays with {m} cookies each and sells {k} cookies. How many cookies remain?", -1),
    ("A class sits at {g} tables of {m} pupils. {k} pupils go home early. How many pupils stay?", -1),
    ("{g} crates hold {m} eggs each. {k} of the eggs break. How many eggs are unbroken?", -1),
    ("A farmer plants {g} rows of {m} trees, and {k} trees die. How many trees are still alive?", -1),
    ("{name} buys {g} packs of {m} stickers and is given {k} more stickers. How many stickers does {name} have?", 1),
    ("A garden has {g} beds with {m} tulips in each bed. {k} more tulips are planted. How many tulips are there now?", 1),
    ("{g} buses carry {m} children each. {k} teachers ride along. How many people ride the buses?", 1),
]


def _story_row(rng: random.Random) -> tuple[str, str]:
    story, sign = rng.choice(STORIES)
    g, m, k, name = rng.randint(2, 9), rng.randint(5, 25), rng.randint(1, 9), rng.choice(NAMES_TRAIN)
    total = g * m
    result = total + sign * k
    step = f"{g} x {m} = {m // 10 * 10 * g} + {m % 10 * g} = {total}" if m >= 10 and m % 10 else f"{g} x {m} = {total}"
    then = f"{k} are taken away: {total} - {k} = {result}" if sign < 0 else f"{k} more: {total} + {k} = {result}"
    return story.format(g=g, m=m, k=k, name=name), f"{g} groups of {m}: {step}. Then {then}.\nAnswer: {result}"


def _change_row(rng: random.Random) -> tuple[str, str]:
    p, n, bill = rng.randint(15, 95), rng.randint(2, 9), 10
    return (f"A pen costs {p} cents. Sam buys {n} pens and pays with {bill} dollars. How many cents of change does he get?",
            f"The pens cost {n} x {p} = {n * p} cents. He pays {bill} x 100 = {bill * 100} cents. "
            f"Change: {bill * 100} - {n * p} = {bill * 100 - n * p} cents.\nAnswer: {bill * 100 - n * p}")


def math_train(rng: random.Random, n: int) -> list[Row]:
    def add() -> tuple[str, str]:
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        return rng.choice(ADD_Q).format(a=a, b=b), _add(a, b)

    def sub() -> tuple[str, str]:
        a, b = rng.randint(5000, 9999), rng.randint(100, 4999)
        return rng.choice(SUB_Q).format(a=a, b=b), _sub(a, b)

    def mul() -> tuple[str, str]:
        a, b = rng.choice([rng.randint(12, 99), rng.randint(100, 299)]), rng.randint(12, 59)
        return rng.choice(MUL_Q).format(a=a, b=b), _mul(a, b)

    def eq() -> tuple[str, str]:
        a, b, x = rng.randint(2, 29), rng.randint(1, 99), rng.randint(1, 70)
        return rng.choice(EQ_Q).format(a=a, b=b, c=a * x + b), _solve(a, b, x)

    makers: list[Callable[[], tuple[str, str]]] = [add, sub, mul, mul, eq, eq, lambda: _story_row(rng),
                                                   lambda: _story_row(rng), lambda: _change_row(rng)]
    return _distinct(n, lambda: rng.choice(makers)())


def math_heldout(rng: random.Random, n: int) -> list[Row]:
    """Other wordings, other ranges (four-digit sums, apples and boxes, equations with x on the right)."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
            q, ans = f"Compute the sum of {a} and {b}.", a + b
        elif kind == 1:
            boxes, per, eaten = rng.randint(3, 9), rng.randint(6, 24), rng.randint(1, 5)
            q, ans = (f"There are {boxes} boxes with {per} apples in each. {eaten} apples are eaten. How many apples are "
                      "left?"), boxes * per - eaten
        elif kind == 2:
            a, x, b = rng.randint(13, 25), rng.randint(31, 60), rng.randint(51, 99)
            q, ans = f"Find x if {a * x + b} = {a}x + {b}.", x
        else:
            a, b = rng.randint(101, 199), rng.randint(21, 49)
            q, ans = f"Multiply {a} by {b}.", a * b
        out.append({"question": q, "domain": "math", "check": {"type": "number", "answer": ans}})
    return out


# ------------------------------------------------------------------ reasoning
NAMES_TRAIN = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon"]
NAMES_HELD = ["Kim", "Lou", "Max", "Ned", "Ola", "Pam", "Quin", "Rex"]
KINDS_TRAIN = [("cats", "mammals", "animals"), ("roses", "flowers", "plants"), ("squares", "rectangles", "shapes"),
               ("oaks", "trees", "plants"), ("sparrows", "birds", "animals"), ("violins", "string instruments", "instruments"),
               ("pines", "trees", "plants"), ("eagles", "birds", "animals"), ("lilies", "flowers", "plants"),
               ("triangles", "polygons", "shapes"), ("cellos", "string instruments", "instruments"),
               ("apples", "fruits", "foods"), ("carrots", "vegetables", "foods"), ("hammers", "tools", "objects"),
               ("spoons", "utensils", "objects"), ("guitars", "string instruments", "instruments")]
KINDS_HELD = [("trout", "fish", "vertebrates"), ("tulips", "bulbs", "plants"), ("cubes", "solids", "shapes"),
              ("wolves", "canines", "mammals")]


# Ordering relations: (relation, the top of the chain, the bottom of the chain)
RELATIONS_TRAIN = [("is taller than", "tallest", "shortest"), ("is older than", "oldest", "youngest"),
                   ("is faster than", "fastest", "slowest"), ("is heavier than", "heaviest", "lightest")]
BEFORE_TRAIN = [("arrived before", "arrived first", "arrived last"), ("woke up before", "woke up first", "woke up last"),
                ("came in ahead of", "came in first", "came in last")]
SYLLOGISM_YES = ["All {x} are {y}. All {y} are {z}. Are all {x} {z}?",
                 "Every one of the {x} is one of the {y}, and all {y} are {z}. Are the {x} {z}?",
                 "If all {x} are {y} and all {y} are {z}, are all {x} {z}? Reply yes or no."]
SYLLOGISM_NO = ["All {x} are {z}. All {w} are {z}. Are all {x} {w}?",
                "If all {x} are {z} and all {w} are {z}, are all {x} {w}? Reply yes or no."]
SEQUENCE_ASKS = ["What comes next: {seq}, ...?", "Give the next number in {seq}.", "Which number follows {seq}?"]


def _chain(names: list[str], rng: random.Random) -> list[str]:
    return rng.sample(names, rng.choice([3, 3, 4]))


def _order_row(rng: random.Random) -> tuple[str, str]:
    """A chain of 3-4 names under one relation; the question asks for one end of it."""
    chain = _chain(NAMES_TRAIN, rng)
    if rng.random() < 0.5:
        rel, top, bottom = rng.choice(RELATIONS_TRAIN)
        facts = " ".join(f"{a} {rel} {b}." for a, b in zip(chain, chain[1:]))
        ask_top = rng.random() < 0.5
        who = chain[0] if ask_top else chain[-1]
        q = f"{facts} Who is the {top if ask_top else bottom}?"
        why = f"From most to least: {', '.join(chain)}. So the {top if ask_top else bottom} is {who}."
    else:
        rel, first, last = rng.choice(BEFORE_TRAIN)
        facts = ", and ".join(f"{a} {rel} {b}" for a, b in zip(chain, chain[1:]))
        ask_first = rng.random() < 0.5
        who = chain[0] if ask_first else chain[-1]
        q = f"{facts}. Who {first if ask_first else last}?"
        why = f"In order: {', '.join(chain)}. So {who} {first if ask_first else last}."
    return q, f"{why}\nAnswer: {who}"


def _syllogism_row(rng: random.Random) -> tuple[str, str]:
    x, y, z = rng.choice(KINDS_TRAIN)
    if rng.random() < 0.6:
        q = rng.choice(SYLLOGISM_YES).format(x=x, y=y, z=z)
        return q, f"Every one of the {x} is one of the {y}, and every one of the {y} is one of the {z}, so yes.\nAnswer: yes"
    w = rng.choice([k[0] for k in KINDS_TRAIN if k[2] == z and k[0] != x] or ["stones"])
    q = rng.choice(SYLLOGISM_NO).format(x=x, w=w, z=z)
    return q, f"Both the {x} and the {w} are {z}, but that does not make the {x} {w}, so no.\nAnswer: no"


def _sequence_row(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        start, step = rng.randint(1, 30), rng.randint(2, 12)
        seq = [start + step * i for i in range(4)]
        nxt, why = seq[-1] + step, f"Each term adds {step}: {seq[-1]} + {step} = {seq[-1] + step}."
    elif kind == 1:
        step = rng.randint(2, 9)
        start = rng.randint(4 * step, 90)
        seq = [start - step * i for i in range(4)]
        nxt, why = seq[-1] - step, f"Each term subtracts {step}: {seq[-1]} - {step} = {seq[-1] - step}."
    else:
        start, ratio = rng.randint(1, 9), rng.choice([2, 3, 4])
        seq = [start * ratio ** i for i in range(4)]
        nxt, why = seq[-1] * ratio, f"Each term is the one before times {ratio}: {seq[-1]} x {ratio} = {seq[-1] * ratio}."
    q = rng.choice(SEQUENCE_ASKS).format(seq=", ".join(map(str, seq)))
    return q, f"{why}\nAnswer: {nxt}"


def reasoning_train(rng: random.Random, n: int) -> list[Row]:
    """Orderings (four relations and three "before" verbs, either end of a 3-4 name chain),
    syllogisms (valid: yes; undistributed middle: no) and sequences (adding, subtracting,
    multiplying), in several wordings; none of them a held-out wording, name or kind."""
    makers = (_order_row, _syllogism_row, _sequence_row)
    return _distinct(n, lambda: makers[rng.randrange(3)](rng))


def reasoning_heldout(rng: random.Random, n: int) -> list[Row]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            x, y, z = rng.choice(KINDS_HELD)
            q, check = (f"Suppose every one of the {x} is one of the {y}, and every one of the {y} is one of the {z}. "
                        f"Must each of the {x} be one of the {z}? Answer yes or no."), {"type": "regex", "pattern": r"(?i)\byes\b"}
        elif kind == 1:
            a, b, c = rng.sample(NAMES_HELD, 3)
            q = f"{a} finished before {b}, and {b} finished before {c}. Who finished last?"
            check = {"type": "regex", "pattern": rf"\b{c}\b"}
        else:
            start, ratio = rng.randint(1, 5), rng.choice([2, 3])
            seq = [start * ratio ** k for k in range(4)]
            q, check = (f"Continue the sequence {' '.join(map(str, seq))} with one more number.",
                        {"type": "number", "answer": seq[-1] * ratio})
        out.append({"question": q, "domain": "reasoning", "check": check})
    return out


# ------------------------------------------------------------------ code
CODE_TRAIN = [
    ("add_{k}", "returns x plus {k}", "def add_{k}(x):\n    return x + {k}"),
    ("times_{k}", "returns x multiplied by {k}", "def times_{k}(x):\n    return x * {k}"),
    ("count_{c}", "counts how many times the letter '{c}' occurs in a string s", "def count_{c}(s):\n    return s.count('{c}')"),
    ("above_{k}", "returns the items of a list xs that are greater than {k}", "def above_{k}(xs):\n    return [x for x in xs if x > {k}]"),
    ("repeat_{k}", "returns the string s repeated {k} times", "def repeat_{k}(s):\n    return s * {k}"),
    ("mod_{k}", "returns True when n is divisible by {k}", "def mod_{k}(n):\n    return n % {k} == 0"),
]
# (name, question, tests); HELD_SOLUTIONS[name] passes its tests (the check is checked: tests/test_seed002_data.py)
CODE_HELD = [
    ("reverse_words", "Write a Python function reverse_words(s) that returns the words of s in reverse order, joined by single spaces.",
     "assert reverse_words('a b c') == 'c b a'\nassert reverse_words('hello') == 'hello'"),
    ("sum_even", "Write a Python function sum_even(xs) that returns the sum of the even numbers in the list xs.",
     "assert sum_even([1, 2, 3, 4]) == 6\nassert sum_even([]) == 0\nassert sum_even([1, 3]) == 0"),
    ("is_palindrome", "Write a Python function is_palindrome(s) that returns True when s reads the same backwards.",
     "assert is_palindrome('level')\nassert not is_palindrome('levels')\nassert is_palindrome('')"),
    ("max_of", "Write a Python function max_of(xs) that returns the largest number in a non-empty list xs.",
     "assert max_of([3, 9, 2]) == 9\nassert max_of([-5, -2]) == -2"),
    ("count_vowels", "Write a Python function count_vowels(s) that returns how many of the letters a, e, i, o, u s holds.",
     "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0"),
    ("fizz", "Write a Python function fizz(n) that returns 'Fizz' when n is divisible by 3 and str(n) otherwise.",
     "assert fizz(9) == 'Fizz'\nassert fizz(10) == '10'"),
    ("square_all", "Write a Python function square_all(xs) that returns a list of the squares of the numbers in xs.",
     "assert square_all([1, 2, 3]) == [1, 4, 9]\nassert square_all([]) == []"),
    ("first_char", "Write a Python function first_char(s) that returns the first character of s, or '' for an empty s.",
     "assert first_char('dmoe') == 'd'\nassert first_char('') == ''"),
    ("count_words", "Write a Python function count_words(s) that returns the number of words in s (split on whitespace).",
     "assert count_words('a bb  ccc') == 3\nassert count_words('') == 0"),
    ("double_list", "Write a Python function double_list(xs) that returns a new list with every number in xs doubled.",
     "assert double_list([1, 5]) == [2, 10]\nassert double_list([]) == []"),
    ("last_item", "Write a Python function last_item(xs) that returns the last element of a non-empty list xs.",
     "assert last_item([4, 5, 6]) == 6\nassert last_item(['x']) == 'x'"),
    ("to_upper", "Write a Python function to_upper(s) that returns s in upper case.",
     "assert to_upper('dMoe') == 'DMOE'"),
    ("factorial", "Write a Python function factorial(n) that returns n! for n >= 0.",
     "assert factorial(0) == 1\nassert factorial(5) == 120"),
    ("unique", "Write a Python function unique(xs) that returns the distinct items of xs in their first order.",
     "assert unique([3, 1, 3, 2, 1]) == [3, 1, 2]\nassert unique([]) == []"),
    ("average", "Write a Python function average(xs) that returns the mean of a non-empty list of numbers.",
     "assert average([2, 4]) == 3\nassert abs(average([1, 2, 2]) - 5 / 3) < 1e-9"),
    ("is_sorted", "Write a Python function is_sorted(xs) that returns True when xs is in non-decreasing order.",
     "assert is_sorted([1, 2, 2, 5])\nassert not is_sorted([2, 1])\nassert is_sorted([])"),
]


HELD_SOLUTIONS = {
    'reverse_words': "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
    'sum_even': 'def sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)',
    'is_palindrome': 'def is_palindrome(s):\n    return s == s[::-1]',
    'max_of': 'def max_of(xs):\n    return max(xs)',
    'count_vowels': "def count_vowels(s):\n    return sum(ch in 'aeiou' for ch in s)",
    'fizz': "def fizz(n):\n    return 'Fizz' if n % 3 == 0 else str(n)",
    'square_all': 'def square_all(xs):\n    return [x * x for x in xs]',
    'first_char': 'def first_char(s):\n    return s[:1]',
    'count_words': 'def count_words(s):\n    return len(s.split())',
    'double_list': 'def double_list(xs):\n    return [2 * x for x in xs]',
    'last_item': 'def last_item(xs):\n    return xs[-1]',
    'to_upper': 'def to_upper(s):\n    return s.upper()',
    'factorial': 'def factorial(n):\n    return 1 if n == 0 else n * factorial(n - 1)',
    'unique': 'def unique(xs):\n    return list(dict.fromkeys(xs))',
    'average': 'def average(xs):\n    return sum(xs) / len(xs)',
    'is_sorted': 'def is_sorted(xs):\n    return all(a <= b for a, b in zip(xs, xs[1:]))',
}


# Training tasks: (name, args, what it does, body, a check that the body passes). Each is a
# sibling of a held-out task's procedure (reverse, sum with a condition, min instead of max,
# count, map over a list, first/last, case, fold, dedupe, mean, order) and none is one of them.
CODE_TASKS = [
    ("reverse_string", "s", "returns s reversed", "return s[::-1]", "reverse_string('abc') == 'cba'"),
    ("last_char", "s", "returns the last character of s, or '' for an empty s", "return s[-1:]", "last_char('ab') == 'b' and last_char('') == ''"),
    ("to_lower", "s", "returns s in lower case", "return s.lower()", "to_lower('DmOe') == 'dmoe'"),
    ("count_spaces", "s", "returns how many spaces s holds", "return s.count(' ')", "count_spaces('a b c') == 2"),
    ("count_char", "s, c", "returns how many times the character c occurs in s", "return s.count(c)", "count_char('banana', 'a') == 3"),
    ("join_words", "words", "returns the strings in the list words joined by single spaces", "return ' '.join(words)", "join_words(['a', 'b']) == 'a b'"),
    ("first_word", "s", "returns the first word of s, or '' when s has none", "words = s.split()\n    return words[0] if words else ''", "first_word('hi there') == 'hi' and first_word('') == ''"),
    ("longest_word", "s", "returns the longest word of s (the first one on a tie)", "return max(s.split(), key=len)", "longest_word('a bbb cc') == 'bbb'"),
    ("remove_spaces", "s", "returns s without its spaces", "return s.replace(' ', '')", "remove_spaces('a b c') == 'abc'"),
    ("count_upper", "s", "returns how many upper-case letters s holds", "return sum(ch.isupper() for ch in s)", "count_upper('DMoe') == 2"),
    ("count_consonants", "s", "returns how many letters of s are not vowels", "return sum(ch.isalpha() and ch not in 'aeiou' for ch in s)", "count_consonants('banana') == 3"),
    ("shout", "s", "returns s in upper case followed by '!'", "return s.upper() + '!'", "shout('hi') == 'HI!'"),
    ("initials", "s", "returns the first letter of every word of s, in upper case", "return ''.join(w[0].upper() for w in s.split())", "initials('big red dog') == 'BRD'"),
    ("is_reversed_pair", "a, b", "returns True when the string b is the string a backwards", "return a == b[::-1]", "is_reversed_pair('ab', 'ba') and not is_reversed_pair('ab', 'ab')"),
    ("word_lengths", "s", "returns a list of the lengths of the words of s", "return [len(w) for w in s.split()]", "word_lengths('a bb') == [1, 2]"),
    ("sum_list", "xs", "returns the sum of the numbers in xs", "return sum(xs)", "sum_list([1, 2, 3]) == 6 and sum_list([]) == 0"),
    ("sum_odd", "xs", "returns the sum of the odd numbers in xs", "return sum(x for x in xs if x % 2 == 1)", "sum_odd([1, 2, 3, 4]) == 4"),
    ("sum_positive", "xs", "returns the sum of the numbers in xs that are greater than zero", "return sum(x for x in xs if x > 0)", "sum_positive([-1, 2, 3]) == 5"),
    ("count_even", "xs", "returns how many numbers in xs are even", "return sum(1 for x in xs if x % 2 == 0)", "count_even([1, 2, 4]) == 2"),
    ("min_of", "xs", "returns the smallest number in a non-empty list xs", "return min(xs)", "min_of([3, 1, 2]) == 1"),
    ("first_item", "xs", "returns the first element of a non-empty list xs", "return xs[0]", "first_item([7, 8]) == 7"),
    ("drop_first", "xs", "returns xs without its first element", "return xs[1:]", "drop_first([1, 2, 3]) == [2, 3]"),
    ("triple_list", "xs", "returns a new list with every number in xs multiplied by 3", "return [3 * x for x in xs]", "triple_list([1, 2]) == [3, 6]"),
    ("cube_all", "xs", "returns a list of the cubes of the numbers in xs", "return [x ** 3 for x in xs]", "cube_all([2, 3]) == [8, 27]"),
    ("add_one_all", "xs", "returns a list with 1 added to every number in xs", "return [x + 1 for x in xs]", "add_one_all([1, 5]) == [2, 6]"),
    ("negate_all", "xs", "returns a list with every number in xs negated", "return [-x for x in xs]", "negate_all([1, -2]) == [-1, 2]"),
    ("lengths", "words", "returns a list of the lengths of the strings in words", "return [len(w) for w in words]", "lengths(['a', 'bcd']) == [1, 3]"),
    ("upper_all", "words", "returns the strings in words in upper case", "return [w.upper() for w in words]", "upper_all(['a', 'b']) == ['A', 'B']"),
    ("positives", "xs", "returns the numbers in xs that are greater than zero", "return [x for x in xs if x > 0]", "positives([-1, 2, 0, 3]) == [2, 3]"),
    ("evens", "xs", "returns the even numbers in xs, in order", "return [x for x in xs if x % 2 == 0]", "evens([1, 2, 3, 4]) == [2, 4]"),
    ("reverse_list", "xs", "returns the elements of xs in reverse order", "return xs[::-1]", "reverse_list([1, 2, 3]) == [3, 2, 1]"),
    ("product_of", "xs", "returns the product of the numbers in xs (1 for an empty list)", "result = 1\n    for x in xs:\n        result *= x\n    return result", "product_of([2, 3, 4]) == 24 and product_of([]) == 1"),
    ("range_of", "xs", "returns the largest number in xs minus the smallest", "return max(xs) - min(xs)", "range_of([4, 1, 9]) == 8"),
    ("count_item", "xs, item", "returns how many times item occurs in xs", "return xs.count(item)", "count_item([1, 2, 1], 1) == 2"),
    ("contains", "xs, item", "returns True when item is in xs", "return item in xs", "contains([1, 2], 2) and not contains([], 1)"),
    ("pair_sums", "xs, ys", "returns the sums of the numbers of xs and ys at the same positions", "return [a + b for a, b in zip(xs, ys)]", "pair_sums([1, 2], [3, 4]) == [4, 6]"),
    ("all_positive", "xs", "returns True when every number in xs is greater than zero", "return all(x > 0 for x in xs)", "all_positive([1, 2]) and not all_positive([1, -2])"),
    ("sorted_desc", "xs", "returns the numbers of xs from largest to smallest", "return sorted(xs, reverse=True)", "sorted_desc([2, 3, 1]) == [3, 2, 1]"),
    ("is_desc", "xs", "returns True when every element of xs is at least as large as the next one", "return all(a >= b for a, b in zip(xs, xs[1:]))", "is_desc([3, 3, 1]) and not is_desc([1, 2])"),
    ("dedupe_count", "xs", "returns how many distinct items xs holds", "return len(set(xs))", "dedupe_count([1, 1, 2]) == 2"),
    ("mean_of_two", "a, b", "returns the mean of the numbers a and b", "return (a + b) / 2", "mean_of_two(2, 4) == 3"),
    ("total_length", "words", "returns the total number of characters in the strings of words", "return sum(len(w) for w in words)", "total_length(['ab', 'c']) == 3"),
    ("is_even", "n", "returns True when n is even", "return n % 2 == 0", "is_even(4) and not is_even(3)"),
    ("is_odd", "n", "returns True when n is odd", "return n % 2 == 1", "is_odd(3) and not is_odd(4)"),
    ("square", "n", "returns n times n", "return n * n", "square(5) == 25"),
    ("cube", "n", "returns n to the power 3", "return n ** 3", "cube(2) == 8"),
    ("absolute", "n", "returns the absolute value of n", "return n if n >= 0 else -n", "absolute(-3) == 3 and absolute(2) == 2"),
    ("sign", "n", "returns 1 for a positive n, -1 for a negative n and 0 for zero", "return (n > 0) - (n < 0)", "sign(5) == 1 and sign(-2) == -1 and sign(0) == 0"),
    ("buzz", "n", "returns 'Buzz' when n is divisible by 5 and str(n) otherwise", "return 'Buzz' if n % 5 == 0 else str(n)", "buzz(10) == 'Buzz' and buzz(7) == '7'"),
    ("sum_to", "n", "returns 1 + 2 + ... + n for n >= 0", "return n * (n + 1) // 2", "sum_to(4) == 10 and sum_to(0) == 0"),
    ("power_of_two", "n", "returns 2 to the power n", "return 2 ** n", "power_of_two(3) == 8"),
    ("double_factorial_free", "n", "returns the product 1 * 2 * ... * n computed with a loop (1 for n = 0)", "result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result", "double_factorial_free(4) == 24 and double_factorial_free(0) == 1"),
    ("larger", "a, b", "returns the larger of a and b", "return a if a >= b else b", "larger(2, 5) == 5"),
    ("smallest_of_three", "a, b, c", "returns the smallest of a, b and c", "return min(a, b, c)", "smallest_of_three(3, 1, 2) == 1"),
    ("digit_sum", "n", "returns the sum of the decimal digits of n >= 0", "return sum(int(d) for d in str(n))", "digit_sum(123) == 6"),
    ("count_digits", "n", "returns how many decimal digits the whole number n has", "return len(str(abs(n)))", "count_digits(-405) == 3"),
    ("to_fahrenheit", "c", "returns the Celsius temperature c in Fahrenheit", "return c * 9 / 5 + 32", "to_fahrenheit(100) == 212"),
    ("is_leap", "year", "returns True when year is a leap year in the Gregorian calendar", "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)", "is_leap(2024) and not is_leap(1900) and is_leap(2000)"),
    ("clamp", "x, lo, hi", "returns x limited to the range lo..hi", "return max(lo, min(x, hi))", "clamp(5, 0, 3) == 3 and clamp(-1, 0, 3) == 0"),
]
CODE_ASKS = ["Define a Python function {sig} that {what}.", "Implement {sig} in Python: it {what}.",
             "Give me a Python function {sig} which {what}.", "In Python, write {sig}, which {what}.",
             "Create the Python function {sig}; it {what}.", "I need a Python function {sig} that {what}."]


def code_train(rng: random.Random, n: int) -> list[Row]:
    """Every task of CODE_TASKS in several wordings, then the parametric tasks of CODE_TRAIN
    (add_17, count_q, ...) up to ``n`` rows. The answer is the function in a code block."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows: dict[str, str] = {}
    for name, args, what, body, _ in CODE_TASKS:
        for ask in CODE_ASKS:
            rows[ask.format(sig=f"{name}({args})", what=what)] = f"```python\ndef {name}({args}):\n    {body}\n```"

    def make() -> tuple[str, str]:
        name, what, body = rng.choice(CODE_TRAIN)
        k, c = rng.randint(2, 99), rng.choice(letters)
        fname, fwhat, fbody = (t.format(k=k, c=c) for t in (name, what, body))
        return rng.choice(CODE_ASKS).format(sig=fname, what=fwhat), f"```python\n{fbody}\n```"

    more = _distinct(max(0, n - len(rows)), make)
    out = [{"instruction": q, "output": a} for q, a in rows.items()] + [r for r in more if r["instruction"] not in rows]
    rng.shuffle(out)
    return out


def code_heldout(rng: random.Random, n: int) -> list[Row]:
    tasks = CODE_HELD * (n // len(CODE_HELD) + 1)
    return [{"question": q, "domain": "code", "check": {"type": "python_tests", "tests": t}} for _, q, t in tasks[:min(n, len(CODE_HELD))]]


# ------------------------------------------------------------------ knowledge
def _split(items: list, rng: random.Random, held_share: float = 0.3) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    k = max(1, int(len(items) * held_share))
    return items[k:], items[:k]


def knowledge_rows(rng: random.Random) -> tuple[list[Row], list[Row]]:
    train: dict[str, str] = {}
    held: list[Row] = []
    cap_tr, cap_he = _split(facts.CAPITALS, rng)
    sym_tr, sym_he = _split(facts.SYMBOLS, rng)
    pl_tr, pl_he = _split(facts.PLANETS, rng, 0.25)
    un_tr, un_he = _split(facts.UNITS, rng)
    yr_tr, yr_he = _split(facts.YEARS, rng)
    src = facts.SOURCES
    cap_q = ["What is the capital of {0}?", "Which city is the capital of {0}?", "What city is {0}'s capital?",
             "Tell me the capital of {0}.", "{0}: what is its capital?", "Where is the seat of government of {0}?",
             "What's the capital city of {0}?", "Capital of {0}?"]
    sym_q = ["What is the chemical symbol for {0}?", "Which symbol stands for {0}?", "How is {0} written as a symbol?",
             "What is the element symbol of {0}?", "Symbol for {0}?", "Which letters denote {0} in chemistry?",
             "What's the periodic-table symbol of {0}?", "How do chemists abbreviate {0}?"]
    for country, city in cap_tr:
        for t in cap_q:
            train[t.format(country)] = f"The capital of {country} is {city} (source: {src['capital']}).\nAnswer: {city}"
        train[f"Which country has {city} as its capital?"] = f"{city} is the capital of {country} (source: {src['capital']}).\nAnswer: {country}"
    for element, sym in sym_tr:
        for t in sym_q:
            train[t.format(element)] = f"The symbol for {element} is {sym} (source: {src['symbol']}).\nAnswer: {sym}"
        train[f"Which element has the symbol {sym}?"] = f"{sym} is the symbol of {element} (source: {src['symbol']}).\nAnswer: {element}"
    for planet, k in pl_tr:
        for t in ("Which planet is number {k} from the Sun?", "Name planet {k} counting from the Sun."):
            train[t.format(k=k)] = f"Planet {k} from the Sun is {planet} (source: {src['planet']}).\nAnswer: {planet}"
        for t in ("What position from the Sun is {p}?", "How many planets out from the Sun is {p}?"):
            train[t.format(p=planet)] = f"{planet} is planet number {k} (source: {src['planet']}).\nAnswer: {k}"
    for quantity, unit in un_tr:
        for t in ("What is the SI unit of {0}?", "In which SI unit is {0} measured?", "Which unit does the SI use for {0}?",
                  "SI unit for {0}?"):
            train[t.format(quantity)] = f"The SI unit of {quantity} is the {unit} (source: {src['unit']}).\nAnswer: {unit}"
    for event, year in yr_tr:
        for t in ("In which year did {0} happen?", "When did {0} take place?", "What year saw {0}?", "Date of {0}?"):
            train[t.format(event)] = (f"{event[0].upper() + event[1:]} happened in {year} (source: {src['year']})."
                                      f"\nAnswer: {year}")
    for country, city in cap_he:
        held.append({"question": f"Name the capital city of {country}.", "domain": "knowledge",
                     "check": {"type": "regex", "pattern": rf"(?i)\b{city}\b"}})
    for element, sym in sym_he:
        held.append({"question": f"Give the element symbol of {element}.", "domain": "knowledge",
                     "check": {"type": "regex", "pattern": rf"\b{sym}\b"}})
    for planet, k in pl_he:
        held.append({"question": f"Counting outward from the Sun, where is {planet}?", "domain": "knowledge",
                     "check": {"type": "number", "answer": k}})
    for quantity, unit in un_he:
        held.append({"question": f"Name the SI unit used for {quantity}.", "domain": "knowledge",
                     "check": {"type": "regex", "pattern": rf"(?i)\b{unit}s?\b"}})
    for event, year in yr_he:
        held.append({"question": f"What year was {event}?", "domain": "knowledge", "check": {"type": "number", "answer": year}})
    return [{"instruction": q, "output": a} for q, a in train.items()], held


# ------------------------------------------------------------------ conversation
GREET_TRAIN = ["Hi there!", "Hello!", "Good morning!", "Hey, how are you?", "Good evening!", "Hi, nice to meet you."]
THANKS_TRAIN = ["Thanks a lot!", "Thank you so much.", "Thanks for the help!", "I appreciate it.", "Cheers, that helped.",
                "Thank you.", "Thank you very much!", "Thanks, that is very kind.", "Much obliged."]
SMALL_TRAIN = ["How is your day going?", "What do you like to talk about?", "I'm bored.", "It's raining here today.",
               "I just finished work.", "Do you like music?"]
BYE_TRAIN = ["Goodbye!", "See you later.", "I have to go now.", "Talk soon!"]
HELD_CONV = ["Hiya, anyone there?", "Many thanks for your patience!", "Greetings, friend.", "What a lovely sunny day.",
             "Ok, I'm heading off, bye!", "Thank you kindly.", "Howdy!", "I'm feeling a bit tired today.",
             "Appreciate your time.", "Evening! How's it going?"]
REPLIES = {
    "greet": ["Hello! How can I help you today?", "Hi! Nice to hear from you. What can I do for you?",
              "Hello there! What would you like to talk about?"],
    "thanks": ["You're welcome! Happy to help.", "Glad I could help. Anything else?", "My pleasure!"],
    "small": ["That sounds nice. Tell me more if you like.", "I'm here and happy to chat. What's on your mind?",
              "I hear you. Would you like a suggestion for something to do?"],
    "bye": ["Goodbye! Take care.", "See you soon. Have a good day!", "Bye for now!"],
}


def conversation_train(rng: random.Random, n: int) -> list[Row]:
    pools = [("greet", GREET_TRAIN), ("thanks", THANKS_TRAIN), ("small", SMALL_TRAIN), ("bye", BYE_TRAIN)]
    prefixes = ["", "Well, ", "Oh, ", "So, ", "Hmm, ", "Okay. ", "Right, ", "Yo, "]
    suffixes = ["", " :)", " !", " Anyway.", " Haha.", " Really.", " Honestly.", " Yeah."]
    def make() -> tuple[str, str]:
        kind, pool = rng.choice(pools)
        q = f"{rng.choice(prefixes)}{rng.choice(pool)}{rng.choice(suffixes)}".strip()
        return q, rng.choice(REPLIES[kind])

    return _distinct(n, make)


def conversation_heldout() -> list[Row]:
    return [{"question": q, "domain": "conversation", "check": {"type": "form", "max_words": 60}} for q in HELD_CONV]


# ------------------------------------------------------------------ off-domain
# Questions none of the five experts is for (word forms, translation): ``auto`` should send
# them to the bare base and do no worse than it. Each has one checkable answer.
OFF_DOMAIN = [
    ("What is the opposite of the word 'hot'?", r"\bcold\b"), ("What is the plural of 'mouse'?", r"\bmice\b"),
    ("Translate 'thank you' into French.", r"(?i)\bmerci\b"), ("Translate the word 'dog' into Spanish.", r"(?i)\bperro\b"),
    ("What is the opposite of 'up'?", r"(?i)\bdown\b"), ("What is the plural of 'child'?", r"(?i)\bchildren\b"),
    ("What is the past tense of the verb 'go'?", r"(?i)\bwent\b"), ("Translate 'water' into German.", r"(?i)\bwasser\b"),
    ("What is the opposite of 'big'?", r"(?i)\b(small|little|tiny)\b"),
    ("Give a word that rhymes with 'cat'.", r"(?i)\b(hat|bat|mat|rat|sat|fat|pat|vat|chat|flat|that|gnat|spat)\b"),
    ("What is the past tense of 'eat'?", r"(?i)\bate\b"), ("Translate 'good night' into Spanish.", r"(?i)buenas noches"),
]


def off_domain_heldout() -> list[Row]:
    return [{"question": q, "domain": "none", "check": {"type": "regex", "pattern": pat}} for q, pat in OFF_DOMAIN]


# ------------------------------------------------------------------ all
def build(seed: int = 0, n_train: int = 600, n_held: int = 40) -> tuple[dict[str, list[Row]], list[Row]]:
    """(training rows per domain, held-out rows with checks)."""
    def rng(domain: str, part: str) -> random.Random:  # one stream per domain and part: editing one leaves the others
        return random.Random(f"seed002:{seed}:{domain}:{part}")

    know_train, know_held = knowledge_rows(rng("knowledge", "split"))
    train = {
        "math": math_train(rng("math", "train"), n_train * 3 // 2), "reasoning": reasoning_train(rng("reasoning", "train"), n_train),
        "code": code_train(rng("code", "train"), n_train), "knowledge": know_train,
        "conversation": conversation_train(rng("conversation", "train"), n_train),
    }
    held = (math_heldout(rng("math", "heldout"), n_held) + reasoning_heldout(rng("reasoning", "heldout"), n_held)
            + code_heldout(rng("code", "heldout"), n_held) + know_held + conversation_heldout() + off_domain_heldout())
    seen = {r["instruction"] for rows in train.values() for r in rows}
    leaked = [r["question"] for r in held if r["question"] in seen]
    if leaked:
        raise DatasetError(f"held-out questions leaked into training: {leaked[:3]}")
    return train, held


def generate(out_dir: str | Path, seed: int = 0, n_train: int = 600, n_held: int = 40) -> dict[str, int]:
    """Write ``<domain>.jsonl``, ``dataset_info.json`` and ``heldout.jsonl`` (with checks); row counts."""
    out = Path(out_dir)
    train, held = build(seed, n_train, n_held)
    registry = {}
    counts: dict[str, int] = {}
    for domain, rows in train.items():
        atomic_write_text(out / f"{domain}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        registry[domain] = {"file_name": f"{domain}.jsonl", "formatting": "alpaca"}
        counts[domain] = len(rows)
    atomic_write_text(out / "dataset_info.json", json.dumps(registry, indent=2) + "\n")
    atomic_write_text(out / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in held))
    counts["heldout"] = len(held)
    return counts
