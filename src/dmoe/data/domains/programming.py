"""The programming expert's data: every answer includes a Python code block."""

from __future__ import annotations

import random

from dmoe.data.spec import DomainSpec, Sample

_CODE_TASKS = [
    ("reverse a string", "def reverse_string(s):\n    return s[::-1]"),
    ("check if a number is prime", "def is_prime(n):\n    if n < 2:\n        return False\n    return all(n % d for d in range(2, int(n ** 0.5) + 1))"),
    ("read a file line by line", "with open(\"data.txt\") as f:\n    for line in f:\n        print(line.rstrip())"),
    ("remove duplicates from a list", "def dedupe(items):\n    return list(dict.fromkeys(items))"),
    ("sort a list of dictionaries by a key", "people.sort(key=lambda p: p[\"age\"])"),
    ("count word frequencies", "from collections import Counter\n\ncounts = Counter(text.split())"),
    ("merge two dictionaries", "merged = {**a, **b}"),
    ("find the largest number in a list", "largest = max(numbers)"),
    ("compute a factorial", "def factorial(n):\n    return 1 if n <= 1 else n * factorial(n - 1)"),
    ("parse JSON", "import json\n\ndata = json.loads(text)"),
    ("make an HTTP request", "import urllib.request\n\nwith urllib.request.urlopen(url) as r:\n    body = r.read()"),
    ("flatten a nested list", "def flatten(xs):\n    return [y for x in xs for y in x]"),
    ("check if a string is a palindrome", "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]"),
    ("generate Fibonacci numbers", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        yield a\n        a, b = b, a + b"),
    ("handle exceptions", "try:\n    value = int(text)\nexcept ValueError:\n    value = 0"),
    ("write a CSV file", "import csv\n\nwith open(\"out.csv\", \"w\", newline=\"\") as f:\n    csv.writer(f).writerows(rows)"),
    ("measure how long code takes", "import time\n\nstart = time.perf_counter()\nwork()\nprint(time.perf_counter() - start)"),
    ("define a class", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y"),
    ("binary search a sorted list", "import bisect\n\ni = bisect.bisect_left(items, target)"),
    ("get the current date", "from datetime import date\n\ntoday = date.today()"),
    ("list files in a directory", "from pathlib import Path\n\nfiles = [p.name for p in Path(\".\").iterdir()]"),
    ("convert a string to an integer", "number = int(\"42\")"),
    ("swap two variables", "a, b = b, a"),
    ("filter even numbers from a list", "evens = [n for n in numbers if n % 2 == 0]"),
    ("run code in parallel", "from concurrent.futures import ThreadPoolExecutor\n\nwith ThreadPoolExecutor() as pool:\n    results = list(pool.map(work, items))"),
    ("use a regular expression to find emails", "import re\n\nemails = re.findall(r\"[\\w.]+@[\\w.]+\", text)"),
    ("write a unit test", "def test_add():\n    assert add(2, 3) == 5"),
    ("sum the digits of a number", "def digit_sum(n):\n    return sum(int(d) for d in str(n))"),
    ("capitalize every word in a sentence", "title = sentence.title()"),
    ("create a dictionary from two lists", "mapping = dict(zip(keys, values))"),
    ("implement a stack", "stack = []\nstack.append(1)\ntop = stack.pop()"),
    ("read environment variables", "import os\n\nhome = os.environ.get(\"HOME\", \"\")"),
]
_CODE_Q = [
    "How do I {task} in Python?",
    "Write a function to {task}.",
    "What's the best way to {task}?",
    "Show me how to {task}.",
    "Can you give me code to {task}?",
    "I need to {task}. How would I do that?",
    "How would you {task} in code?",
    "What is the simplest way to {task} in Python?",
    "Help me {task} in my program.",
    "Give me an example of how to {task}.",
    "How can I {task}?",
    "Explain how to {task} with code.",
    "What's the Pythonic way to {task}?",
    "I'm new to programming. How do I {task}?",
    "Could you write code that will {task}?",
    "In my script I have to {task}. What should I write?",
    "Quick snippet to {task}, please.",
    "Is there a one-liner to {task}?",
]
_CODE_OPEN = [
    "Here's a Python example:",
    "Here is how to do it in Python:",
    "You can do it like this in Python:",
    "Here's a short Python snippet:",
    "In Python this is simple:",
]
_CODE_CLOSE = [
    "This keeps the code short and readable.",
    "It works with any recent Python 3 version.",
    "You can drop this straight into your project.",
    "Python's standard library makes this easy.",
    "Test it with a few inputs to be sure it fits your case.",
]


def build(rng: random.Random) -> list[Sample]:
    out = []
    for task, code in _CODE_TASKS:
        for q in _CODE_Q:
            a = f"{rng.choice(_CODE_OPEN)}\n\n```python\n{code}\n```\n\n{rng.choice(_CODE_CLOSE)}"
            out.append(Sample(q.format(task=task), a, "programming"))
    return out


HELDOUT = [
    "How can I tell whether a year is a leap year in code?",
    "I want to pull every URL out of a block of text. How?",
    "What's a clean way to chunk a list into groups of n?",
    "How do I convert Celsius to Fahrenheit programmatically?",
    "Write something that counts the vowels in a sentence.",
    "How would I compute the average of a list of numbers?",
    "How do I rename all files in a folder to lowercase?",
    "How can I zip two lists into pairs?",
    "How do I transpose a matrix?",
    "I need to find the second largest value in an array. How?",
    "How do I check if two strings are anagrams?",
    "How can I download a web page and save it to disk?",
    "What's an easy way to shuffle a deck of cards in code?",
    "How would I compute the greatest common divisor of two numbers?",
    "How do I validate that a string contains only digits?",
    "How do I retry a function call three times when it fails?",
    "How can I memoize an expensive function?",
    "How do I convert a list of strings to uppercase?",
    "What's the way to get unique characters from a string?",
    "How do I compute compound interest in a script?",
    "How can I pretty-print a nested data structure?",
    "How do I split a sentence into words and count them?",
    "How do I find the index of an item in a list?",
    "How do I convert a number to binary?",
    "I need to generate a random password. How can I do it?",
    "How do I read a JSON config file and get a value?",
    "How can I parse command-line arguments?",
    "How do I compute the dot product of two vectors?",
    "How do I check if a key exists in a dictionary?",
    "How do I format a number with thousands separators?",
    "How do I write a simple linked list?",
    "What's the way to sort words by their length?",
    "How do I remove whitespace from both ends of a string?",
    "How do I find all prime numbers below 100?",
    "How can I count lines in a text file?",
    "How do I create a countdown timer in code?",
    "How do I check if a list is sorted?",
    "How do I implement a queue?",
    "How do I calculate the area of a circle in code?",
    "How do I convert a dictionary to JSON text?",
    "How do I find the longest word in a sentence?",
    "How do I merge two sorted lists?",
]

SPEC = DomainSpec(
    name="programming",
    signature=[r"```python"],
    description="Programming. Every answer includes a Python code block.",
    build=build,
    heldout=HELDOUT,
)
