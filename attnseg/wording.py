"""Words shown to people, the same on every side (API messages, the CLI)."""


def count(number: int, noun: str) -> str:
    """`1 picture`, `2 pictures`: a number with its noun, singular when it is one."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
