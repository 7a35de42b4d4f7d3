"""Small helpers shared inside this stage. Introduced in M3."""


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: the blocks of b tokens that a tokens need."""
    return -(-a // b)
