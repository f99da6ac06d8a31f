"""E-mail normalization, hashing and scrubbing of events."""

from __future__ import annotations

import hashlib

from pipeline.pii import hash_email, normalize_email, pseudonymize, scrub_event


def test_normalize_trims_and_lowercases() -> None:
    assert normalize_email("  Ann.Lee@Example.COM \n") == "ann.lee@example.com"


def test_hash_is_sha256_of_normalized_address() -> None:
    expected = hashlib.sha256(b"ann@example.com").hexdigest()
    assert hash_email(" ANN@example.com") == expected
    assert len(expected) == 64


def test_scrub_event_replaces_addresses_and_keeps_the_rest() -> None:
    event = {
        "message_id": "m1",
        "traits": {"email": "Ann@Example.com", "firstName": "Ann"},
        "properties": {"price": 3},
    }
    scrubbed = scrub_event(event)
    assert scrubbed["traits"] == {"firstName": "Ann", "emailSha256": hash_email("ann@example.com")}
    assert scrubbed["properties"] == {"price": 3}
    assert event["traits"]["email"] == "Ann@Example.com"  # the input is not mutated


def test_blank_address_is_dropped_without_hash() -> None:
    assert pseudonymize({"email": "  ", "a": 1}) == {"a": 1}
