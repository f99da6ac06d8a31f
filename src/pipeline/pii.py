"""Personal data helpers: e-mail normalization and SHA-256 pseudonyms.

Events and warehouse rows carry ``emailSha256`` instead of the address; the clear address is
kept only in the profile's traits, where sending needs it. Hashing the normalized address
(trimmed, lower-cased) makes the hash a stable join key, as ad platforms expect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

EMAIL_KEYS = ("email", "Email", "e-mail")
HASH_KEY = "emailSha256"


def normalize_email(address: str) -> str:
    """The comparable form of an address: surrounding blanks removed, lower case."""
    return address.strip().lower()


def sha256_hex(value: str) -> str:
    """SHA-256 of a UTF-8 string as 64 lower-case hex digits."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def hash_email(address: str) -> str:
    """SHA-256 of the normalized address."""
    return sha256_hex(normalize_email(address))


def pseudonymize(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` whose e-mail entries are replaced by ``emailSha256``."""
    out = {k: v for k, v in fields.items() if k not in EMAIL_KEYS}
    for key in EMAIL_KEYS:
        value = fields.get(key)
        if isinstance(value, str) and value.strip():
            out[HASH_KEY] = hash_email(value)
            break
    return out


def scrub_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an event record fit for the warehouse: no clear e-mail in traits/properties."""
    out = dict(event)
    for section in ("traits", "properties"):
        value = out.get(section)
        if isinstance(value, Mapping) and any(k in value for k in EMAIL_KEYS):
            out[section] = pseudonymize(value)
    return out
