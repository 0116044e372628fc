"""Evaluation prompts for benchmarks: hand-written for Gorgon, never used to train heads."""

CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, for a ten-year-old.",
    "What are the pros and cons of working from home?",
    "Give me a packing list for a three-day hiking trip.",
    "Describe the rules of chess in a few paragraphs.",
    "Write an email asking my landlord to fix a leaking faucet.",
    "What should I consider when adopting a dog?",
    "Compare trains and planes for travelling between two cities 500 km apart.",
]

CODE = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python class for a stack with push, pop and peek methods.",
    "Write a Python function that counts the words in a text file.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a bash script that prints the ten largest files in a directory.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case.",
    "Write a JavaScript function that removes duplicates from an array.",
    "Write a Python function that converts a Roman numeral to an integer.",
]

ALL = CHAT + CODE

# chat and code alternating, so that the first n prompts of a shorter run hold both kinds
MIXED = [p for pair in zip(CHAT, CODE) for p in pair]
