"""Training prompts that the project makes itself, for self-distilled head training.

Three sources, none of them a public benchmark (see FACTS.md): templates over topics and
tasks, snippets of Python's own standard library (read with `inspect`) with a coding
instruction, and questions the base model writes itself from a seed topic. Everything is
drawn from a seeded `random.Random`, so a seed fixes the prompt list.
"""
from __future__ import annotations

import importlib
import inspect
import random
import zlib

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the French Revolution",
    "the Roman Empire", "machine learning", "neural networks", "climate change", "recycling",
    "the human heart", "vaccines", "sleep", "meditation", "coffee", "bread baking", "chess",
    "soccer", "the piano", "jazz", "impressionist painting", "poetry", "public speaking",
    "time management", "personal budgeting", "saving for retirement", "job interviews",
    "remote work", "electric cars", "solar panels", "wind energy", "the internet", "email etiquette",
    "password security", "databases", "sorting algorithms", "binary search", "recursion",
    "prime numbers", "fractions", "probability", "the Pythagorean theorem", "gravity",
    "magnets", "electricity", "the moon", "Mars", "dinosaurs", "honeybees", "cats", "dogs",
    "gardening", "composting", "houseplants", "hiking", "camping", "cooking rice", "pasta",
    "healthy breakfast", "running", "yoga", "learning a language", "reading habits",
    "writing a resume", "starting a small business", "marketing", "customer service",
    "friendship", "kindness", "rainforests", "oceans", "coral reefs", "deserts", "mountains",
    "rivers", "earthquakes", "weather forecasts", "clouds", "rainbows", "the printing press",
    "the steam engine", "airplanes", "trains", "bicycles", "city planning", "libraries",
    "museums", "board games", "video games", "photography", "movies", "music theory",
    "the guitar", "origami", "knitting", "birds", "whales", "ants", "the immune system",
    "nutrition", "drinking water", "first aid", "fire safety", "the Olympic Games",
    "ancient Egypt", "the Renaissance", "democracy", "taxes", "inflation", "supply and demand",
    "cryptography", "open source software", "version control with git", "the Linux shell",
    "spreadsheets", "unit testing", "HTTP", "JSON", "regular expressions", "Python lists",
    "Python dictionaries", "object-oriented programming", "linked lists", "hash tables",
]

TASKS = [
    "Explain {topic} in simple terms.",
    "What is {topic}? Give a short answer.",
    "Write a short paragraph about {topic}.",
    "Give me three interesting facts about {topic}.",
    "List five key points a beginner should know about {topic}.",
    "Write a short poem about {topic}.",
    "Write a haiku about {topic}.",
    "Tell a short story that involves {topic}.",
    "What are the pros and cons of {topic}?",
    "How would you explain {topic} to a ten-year-old?",
    "Summarize the history of {topic} in a few sentences.",
    "Write a tweet about {topic}.",
    "Give me a quiz question about {topic} and its answer.",
    "What are common misconceptions about {topic}?",
    "Write an email to a friend recommending they learn about {topic}.",
    "Compare {topic} and {other}.",
    "How are {topic} and {other} related?",
    "Write a step-by-step guide to getting started with {topic}.",
    "Why is {topic} important?",
    "Describe {topic} in exactly three sentences.",
]

CODE_TASKS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that counts the words in a sentence.",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that removes duplicates from a list while keeping order.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a Python function that computes the average of a list of numbers.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that finds the largest element in a list.",
    "Write a Python script that reads a text file and prints the number of lines.",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that sorts a list of dictionaries by a key.",
    "Write a Python function that computes the factorial of a number.",
    "Write a JavaScript function that adds two numbers.",
    "Write a SQL query that selects all users older than 30.",
    "Write a bash command that counts the files in a directory.",
]

SNIPPET_TASKS = [
    "Explain what this Python code does:\n\n```python\n{code}\n```",
    "Add comments to this Python code:\n\n```python\n{code}\n```",
    "Summarize this function in one paragraph:\n\n```python\n{code}\n```",
    "How could this Python code be improved?\n\n```python\n{code}\n```",
    "Write a short docstring for this function:\n\n```python\n{code}\n```",
]

SNIPPET_MODULES = [
    "textwrap", "string", "json.encoder", "json.decoder", "collections", "functools", "heapq",
    "bisect", "shlex", "fnmatch", "glob", "posixpath", "calendar", "statistics", "random",
    "difflib", "csv", "base64", "html", "ipaddress", "colorsys", "fractions", "copy", "queue",
    "tokenize", "pprint", "reprlib", "dataclasses", "enum", "gettext", "locale", "zipfile",
]

SELF_WRITTEN_REQUEST = ("Write one question that a curious person might ask an AI assistant "
                        "about {topic}. Reply with the question only.")


def python_snippets(max_chars: int = 900, min_lines: int = 4, max_lines: int = 30) -> list[str]:
    """Source of small functions from the standard library, in a stable order."""
    snippets = []
    for name in SNIPPET_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in sorted(vars(module).items()):
            if not inspect.isfunction(obj) or getattr(obj, "__module__", None) != module.__name__:
                continue
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            lines = source.count("\n")
            if min_lines <= lines <= max_lines and len(source) <= max_chars:
                snippets.append(source.rstrip())
    return snippets


def template_prompts(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        topic, other = rng.sample(TOPICS, 2)
        out.append(rng.choice(TASKS).format(topic=topic, other=other))
    return out


def snippet_prompts(rng: random.Random, count: int) -> list[str]:
    snippets = python_snippets()
    return [rng.choice(SNIPPET_TASKS).format(code=rng.choice(snippets)) for _ in range(count)]


def code_prompts(rng: random.Random, count: int) -> list[str]:
    return [rng.choice(CODE_TASKS) for _ in range(count)]


def self_written_requests(rng: random.Random, count: int) -> list[str]:
    """Requests that make the base model write a question; its answers become prompts."""
    return [SELF_WRITTEN_REQUEST.format(topic=rng.choice(TOPICS)) for _ in range(count)]


def clean_model_question(text: str) -> str | None:
    """The first line of what the model wrote, if it reads like a question."""
    line = text.strip().split("\n")[0].strip()
    if ":" in line and "?" in line.split(":", 1)[1]:  # 'A curious person might ask: "...?"'
        line = line.split(":", 1)[1]
    line = line.strip().strip('"').strip()
    return line if 10 <= len(line) <= 300 else None


def is_held_out(prompt: str, held_out_fraction: float) -> bool:
    """A stable split by prompt text: the same prompt always lands on the same side."""
    return (zlib.crc32(prompt.encode()) % 10_000) < held_out_fraction * 10_000
