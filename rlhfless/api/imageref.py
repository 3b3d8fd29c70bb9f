"""Container image references, as the Docker/OCI reference grammar defines them.

From github.com/distribution/reference (the grammar container runtimes apply):

    reference         := name [ ":" tag ] [ "@" digest ]
    name              := [domain '/'] remote-name
    domain            := host [':' port-number]
    host              := domain-name | IPv4address | '[' IPv6address ']'
    domain-name       := domain-component ['.' domain-component]*
    domain-component  := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
    port-number       := /[0-9]+/
    remote-name       := path-component ['/' path-component]*
    path-component    := alpha-numeric [separator alpha-numeric]*
    alpha-numeric     := /[a-z0-9]+/
    separator         := /[_.]|__|[-]+/
    tag               := /[\\w][\\w.-]{0,127}/
    digest            := algorithm ":" hex   (sha256: 64, sha384: 96, sha512: 128 hex digits)

and a name of at most 255 characters. `REFERENCE_PATTERN` is the grammar as one RE2-compatible
regular expression; `NAME_LENGTH_PATTERN` adds the length limit as a second one, since one
regular expression cannot count the name's part of the string.

A job never names an image (its pods run the operator's); the operator checks the images it
is configured with (`knative.pods.FunctionSettings.from_env`) and refuses to start with a
malformed one rather than create pods no node can pull.
"""

from __future__ import annotations

import re

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = f"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_NAME = f"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_WORD = "[A-Za-z0-9_]"  # Go's \w: ASCII only
_TAG = f"{_WORD}[A-Za-z0-9_.-]{{0,127}}"
_DIGEST = "(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})"

REFERENCE_PATTERN = f"^{_NAME}(?::{_TAG})?(?:@{_DIGEST})?$"
MAX_NAME_LENGTH = 255
# Equivalent to "the name part has at most 255 characters" for any string REFERENCE_PATTERN
# accepts: the first part can only end where the tag or digest starts.
NAME_LENGTH_PATTERN = f"^.{{1,{MAX_NAME_LENGTH}}}(?::{_TAG})?(?:@{_DIGEST})?$"
MAX_REFERENCE_LENGTH = MAX_NAME_LENGTH + 1 + 128 + 1 + len("sha512:") + 128  # 520

_REFERENCE = re.compile(REFERENCE_PATTERN)
_NAME_LENGTH = re.compile(NAME_LENGTH_PATTERN)


def image_errors(reference: str) -> list[str]:
    """Why `reference` is not a valid image reference (empty when it is)."""
    if not _REFERENCE.fullmatch(reference):
        return [f"{reference!r} is not a valid image reference: [registry[:port]/]path"
                "[:tag][@sha256:<64 hex>], lowercase path components (e.g. "
                "ghcr.io/rlhfless/rlhfless:0.1.0)"]
    if not _NAME_LENGTH.fullmatch(reference):
        return [f"the image name (before the tag or digest) may have at most "
                f"{MAX_NAME_LENGTH} characters"]
    return []


def check_image(reference: str) -> str:
    """A pydantic after-validator: the reference unchanged when it is valid."""
    errors = image_errors(reference)
    if errors:
        raise ValueError(errors[0])
    return reference
