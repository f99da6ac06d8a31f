"""The development keys the collector and API accept out of the box, and the warning when they
would be reachable from beyond this machine."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from pydantic import SecretStr

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warn_if_dev_key_exposed(
    what: str, host: str, keys: Mapping[str, SecretStr], dev_key: SecretStr, setting: str
) -> bool:
    """Log a warning (and return True) when ``dev_key`` is accepted on a non-loopback host."""
    dev = dev_key.get_secret_value()
    if is_loopback(host) or not any(k.get_secret_value() == dev for k in keys.values()):
        return False
    log.warning("the %s on %s accepts the development key; set %s", what, host, setting)
    return True
