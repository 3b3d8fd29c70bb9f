"""Kubernetes resource quantities (`cpu: 500m`, `memory: 32Gi`), as resource.Quantity reads them.

The grammar (k8s.io/apimachinery/pkg/api/resource):

    quantity        ::= signedNumber suffix
    signedNumber    ::= number | sign number          sign ::= "+" | "-"
    number          ::= digits | digits "." digits | digits "." | "." digits
    suffix          ::= binarySI | decimalExponent | decimalSI
    binarySI        ::= Ki | Mi | Gi | Ti | Pi | Ei
    decimalSI       ::= m | "" | k | M | G | T | P | E
    decimalExponent ::= "e" signedNumber | "E" signedNumber   (an integer in practice)

A resource request cannot be negative, so the sign here is at most "+". Values above
2^63-1 are clamped to it, as Kubernetes does. `QUANTITY_PATTERN` is the same grammar as one
regular expression (RE2 syntax) for the CRD schema.
"""

from __future__ import annotations

import re
from fractions import Fraction

QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][-+]?[0-9]+)?$"
MAX_QUANTITY_LENGTH = 64
MAX_VALUE = Fraction(2**63 - 1)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_EXPONENT_CAP = 64  # beyond it a value is below a nano-unit or above the clamp anyway
_RE = re.compile(QUANTITY_PATTERN)


def parse_quantity(text: str) -> Fraction:
    """The value of a quantity in base units (cores, bytes); ValueError naming the grammar."""
    match = _RE.fullmatch(text)
    if match is None or len(text) > MAX_QUANTITY_LENGTH:
        hint = "it must not be negative; " if text.strip().startswith("-") else ""
        raise ValueError(f"{text!r} is not a Kubernetes quantity ({hint}e.g. 500m, 2, 1.5, "
                         f"32Gi, 512M, 1e3; at most {MAX_QUANTITY_LENGTH} characters)")
    number, _, suffix = match.groups()
    suffix = suffix or ""
    value = Fraction(number if not number.endswith(".") else number[:-1])
    if suffix in _BINARY:
        value *= 1024 ** _BINARY[suffix]
    else:
        exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:])
        exponent = max(-_EXPONENT_CAP, min(_EXPONENT_CAP, exponent))
        value *= Fraction(10) ** exponent
    return min(value, MAX_VALUE)


def quantity_is_text(value: object) -> object:
    """A pydantic before-validator: a bare number is refused with the spelling that works."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'quantities are strings here: write "{value}"')
    return value


def check_quantity(text: str) -> str:
    """A pydantic after-validator: the text unchanged when it parses."""
    parse_quantity(text)
    return text


def quantity_bytes(text: str) -> int:
    """A memory quantity in bytes (rounded up, as Kubernetes does)."""
    value = parse_quantity(text)
    return -(-value.numerator // value.denominator)


def format_bytes(n: float) -> str:
    """Bytes in binary units, e.g. 1.5 GiB (what memory estimates are printed in)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
