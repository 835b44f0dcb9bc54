"""Target environment -> facts: does any argument name production (or another environment)?

Every string value is split into words on anything that is not a letter or digit, so
`prod-db.internal`, `DATABASE=production` and `orders_prod` all name production, while
`products` and `preprod` do not. Arguments declared of kind "env" are read as an environment name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

PROD_NAMES = frozenset({"prod", "production", "prd", "live"})
ENV_NAMES = {
    "prod": "production", "production": "production", "prd": "production",
    "staging": "staging", "stage": "staging", "stg": "staging",
    "preprod": "preprod", "uat": "uat", "qa": "qa",
    "dev": "development", "development": "development",
    "test": "test", "testing": "test", "sandbox": "sandbox",
}  # fmt: skip
_WORDS = re.compile(r"[a-z0-9]+")
_MAX_SCAN = 65536  # a 10 MB body is not scanned for the word "prod" beyond its first 64 KiB


def empty() -> dict[str, Any]:
    return {"prod": False, "names": [], "declared": []}


def classify_env(strings: Iterable[str], declared: list[str]) -> dict[str, Any]:
    """Environment names mentioned in `strings`; `declared` values are environment names themselves."""
    names: list[str] = []
    prod = False
    for text in strings:
        for word in _WORDS.findall(text[:_MAX_SCAN].lower()):
            name = ENV_NAMES.get(word)
            if name is not None:
                names.append(name)
                prod |= word in PROD_NAMES - {"live"}
    for value in declared:
        word = value.strip().lower()
        names.append(ENV_NAMES.get(word, word))
        prod |= word in PROD_NAMES or ENV_NAMES.get(word) == "production"
    return {"prod": prod, "names": list(dict.fromkeys(names)), "declared": list(dict.fromkeys(declared))}
