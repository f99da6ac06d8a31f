"""Write keys: which source sent a request. Keys are compared in constant time, never logged."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr

from pipeline.collector.errors import RequestRejected


def write_key_from_authorization(header: str | None) -> str | None:
    """The write key of an HTTP Basic ``Authorization`` header (key as user name), if any."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic" or not credentials.strip():
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
        return None
    user, _, _password = decoded.partition(":")
    return user or None


class WriteKeys:
    """Resolves a write key to its source id; the keys themselves are kept only as digests."""

    def __init__(self, keys: Mapping[str, SecretStr]) -> None:
        self._by_digest = {_digest(key.get_secret_value()): source for source, key in keys.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def source_for(self, write_key: str | None) -> str:
        """The source id of ``write_key``; a missing or unknown key is a 401 refusal."""
        if not write_key:
            raise RequestRejected(
                401,
                "missing_write_key",
                "no write key: send it as the HTTP Basic user name or as writeKey in the body",
            )
        digest = _digest(write_key)
        found: str | None = None
        for known, source in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = source
        if found is None:
            raise RequestRejected(401, "invalid_write_key", "the write key is not valid")
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
