"""Training prompts that the project makes itself, for self-distilled head training.

Sources, none of them a public benchmark (see FACTS.md): templates over topics and tasks,
everyday requests (letters, plans, lists, stories, advice) over their own subjects, coding
tasks composed from a language, an operation and a style, snippets of Python's own standard
library (read with `inspect`) with a coding instruction, and questions the base model
writes itself from a seed topic. Everything is drawn from a seeded `random.Random`,
so a seed fixes the prompt list.
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

# Everyday requests: genres the topic templates above do not cover, each over its own subjects.
EVERYDAY = [
    "Write a {tone} email to my {person} about {matter}.",
    "Write a short message to my {person} to say {message}.",
    "Make a checklist for {occasion}.",
    "Give me a plan for {occasion}, step by step.",
    "Plan a {days}-day itinerary for a visit to {place}.",
    "Write a short story about {character} who {event}.",
    "Write a {tone} speech for {occasion}.",
    "Suggest five names for {business}.",
    "Write a product description for {product}.",
    "Write a review of {product}.",
    "What should I do if {problem}?",
    "How can I {goal}? Give practical tips.",
    "Write a dialogue between {character} and my {person} about {matter}.",
    "Give me a weekly schedule to {goal}.",
    "Write a recipe for {dish}, with ingredients and steps.",
    "Explain the difference between {thing} and {other_thing}.",
    "Which is better for {purpose}: {thing} or {other_thing}? Explain briefly.",
    "Write a limerick about {character}.",
    "Describe {place} to someone who has never been there.",
    "Write a cover letter for a job as {job}.",
]
EVERYDAY_FIELDS = {
    "tone": ["friendly", "formal", "polite", "short", "cheerful", "apologetic", "persuasive"],
    "person": ["boss", "neighbour", "teacher", "colleague", "brother", "grandmother", "doctor",
               "team", "coach", "roommate", "client", "professor"],
    "matter": ["a late delivery", "a team dinner", "a project deadline", "a noisy party",
               "a broken heater", "a birthday surprise", "a change of schedule", "a lost book",
               "a new website", "a parking problem", "a vacation request", "a thank-you gift"],
    "message": ["thank you for the help", "I will be late tomorrow", "congratulations on the new job",
                "the meeting moved to Friday", "I found their keys", "happy anniversary"],
    "occasion": ["moving to a new apartment", "a wedding toast", "a job interview", "a school reunion",
                 "a first day at a new job", "a birthday party for a child", "a garage sale",
                 "a charity run", "a family picnic", "preparing for an exam", "a retirement party",
                 "a product launch"],
    "days": ["two", "three", "four", "five", "seven"],
    "place": ["Paris", "Tokyo", "a small mountain village", "New York", "Rome", "a national park",
              "Lisbon", "a desert island", "Cairo", "a busy market", "Vancouver", "an old castle"],
    "character": ["a retired astronaut", "a curious robot", "a young baker", "a lonely dragon",
                  "a detective cat", "a shy musician", "a time traveller", "a village doctor",
                  "a talking tree", "a clumsy wizard", "a pirate captain", "a street artist"],
    "event": ["loses a map", "wins a contest", "finds a secret door", "meets an old friend",
              "gets stuck in an elevator", "learns to fly", "opens a tiny shop", "misses a train"],
    "business": ["a coffee shop", "a bicycle repair shop", "a bakery", "a dog-walking service",
                 "a bookstore", "a cleaning company", "a mobile app for recipes", "a yoga studio"],
    "product": ["a reusable water bottle", "noise-cancelling headphones", "a standing desk",
                "a smart thermostat", "a travel backpack", "a mechanical keyboard", "an electric kettle",
                "a board game for families", "a fitness tracker", "a solar-powered lamp"],
    "problem": ["my laptop is very slow", "my plants keep dying", "I cannot fall asleep",
                "my phone battery drains fast", "I forgot my password", "my neighbour is too loud",
                "I feel stressed at work", "my bread does not rise", "my car makes a strange noise"],
    "goal": ["save more money", "learn to cook", "get better at math", "drink more water",
             "read more books", "run five kilometres", "speak more confidently", "keep my desk tidy",
             "learn to draw", "wake up earlier", "learn Spanish", "stay focused while studying"],
    "dish": ["vegetable soup", "banana bread", "a simple curry", "pancakes", "a green salad",
             "tomato pasta", "fried rice", "chocolate cookies", "guacamole", "lentil stew"],
    "thing": ["a laptop", "tea", "a savings account", "a bicycle", "an e-book", "a tent",
              "renting", "a gas stove", "a paper notebook", "a city apartment"],
    "other_thing": ["a tablet", "coffee", "an investment fund", "a scooter", "a printed book",
                    "a hammock", "buying", "an induction hob", "a note-taking app", "a country house"],
    "purpose": ["a student", "a long trip", "a small family", "working from a cafe", "a beginner",
                "a rainy climate", "someone on a budget"],
    "job": ["a librarian", "a junior web developer", "a nurse", "a barista", "a data analyst",
            "a tour guide", "a teaching assistant", "a graphic designer"],
}

# Coding tasks: a language, an operation and a style; none of them an evaluation prompt.
CODE_LANGUAGES = ["Python"] * 5 + ["JavaScript", "bash", "C", "Go", "SQL"]
CODE_OPERATIONS = [
    "counts the vowels in a string", "finds the second largest number in a list",
    "checks whether two strings are anagrams", "returns the greatest common divisor of two numbers",
    "reverses the words in a sentence", "returns the sum of the digits of a number",
    "converts a temperature from Fahrenheit to Celsius", "checks whether a year is a leap year",
    "finds the most common element in a list", "splits a list into chunks of a given size",
    "computes the median of a list of numbers", "capitalizes the first letter of every word",
    "returns the prime numbers below a limit", "rotates a list by k positions",
    "counts how often each character appears in a string", "checks whether a list is sorted",
    "converts a binary string to an integer", "returns the intersection of two lists",
    "computes the power of a number without using the built-in operator",
    "finds the longest word in a sentence", "validates an email address in a simple way",
    "returns the n-th triangular number", "transposes a matrix given as a list of lists",
    "removes all whitespace from a string", "finds the index of an item with binary search",
    "computes the running total of a list", "returns the last n lines of a text",
    "groups a list of words by their first letter", "converts seconds into hours, minutes and seconds",
    "checks whether a number is a perfect square", "returns the distance between two points",
    "sorts a list of tuples by their second element", "counts the lines that contain a given word",
    "generates a random password of a given length", "parses a date string into day, month and year",
    "computes the area of a circle from its radius", "finds all pairs in a list that add up to a target",
    "implements bubble sort", "implements a queue using two lists", "returns the factors of a number",
]
CODE_STYLES = ["", " Add a docstring.", " Include an example call.", " Use a loop, not recursion.",
               " Explain the code after it.", " Keep it short.", " Handle invalid input.",
               " Add comments to each step.", " Add type hints."]
CODE_FORMS = ["Write a {language} function that {operation}.", "In {language}, write code that {operation}.",
              "Show me how to write a {language} program that {operation}."]
SQL_TABLES = ["orders", "employees", "products", "students", "books", "customers", "flights"]
SQL_QUERIES = ["that counts the rows in the {table} table per month",
               "that finds the ten most recent rows in the {table} table",
               "that joins the {table} table with a users table on user_id",
               "that returns duplicate names in the {table} table",
               "that computes the average price in the {table} table per category"]

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


def everyday_prompt(rng: random.Random) -> str:
    template = rng.choice(EVERYDAY)
    fields = {name: rng.choice(values) for name, values in EVERYDAY_FIELDS.items() if "{" + name + "}" in template}
    return template.format(**fields)


def composed_code_prompt(rng: random.Random) -> str:
    language = rng.choice(CODE_LANGUAGES)
    if language == "SQL":
        return "Write a SQL query " + rng.choice(SQL_QUERIES).format(table=rng.choice(SQL_TABLES)) + "."
    form = rng.choice(CODE_FORMS).format(language=language, operation=rng.choice(CODE_OPERATIONS))
    return form + rng.choice(CODE_STYLES)


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
