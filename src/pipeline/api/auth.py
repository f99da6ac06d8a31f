"""Who is calling: an API key (``X-API-Key``) or an OAuth2 bearer JWT verified against
configured keys. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from pydantic import SecretStr

from pipeline.api.config import JwtSettings
from pipeline.errors import ConfigurationError

REALM = "pipeline"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the API key's client name or the token's subject."""

    kind: Literal["api_key", "jwt"]
    name: str
    claims: Mapping[str, Any]


class AuthenticationFailed(Exception):
    """The request carries no valid credentials; becomes a 401 with ``WWW-Authenticate``."""

    def __init__(self, code: str, detail: str, *, bearer_error: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.bearer_error = bearer_error

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value (RFC 6750 for bearer tokens)."""
        bearer = f'Bearer realm="{REALM}"'
        if self.bearer_error:
            bearer += f', error="{self.bearer_error}"'
        return f'{bearer}, APIKey realm="{REALM}", header="X-API-Key"'


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """Resolves an API key to its client name; keys are kept only as digests."""

    def __init__(self, keys: Mapping[str, SecretStr]) -> None:
        self._by_digest = [(_digest(k.get_secret_value()), name) for name, k in keys.items()]

    def client_for(self, key: str) -> str | None:
        """The client name of ``key``; every known key is compared, so timing reveals nothing."""
        digest = _digest(key)
        found: str | None = None
        for known, name in self._by_digest:
            if hmac.compare_digest(known, digest):
                found = name
        return found


class JwtVerifier:
    """Verifies HS256/RS256 JWTs: signature, ``exp`` (required), ``iss`` and ``aud`` if set."""

    def __init__(self, config: JwtSettings) -> None:
        self._config = config
        self._keys: dict[str, Any] = {}
        if config.hs256_secret is not None:
            self._keys["HS256"] = config.hs256_secret.get_secret_value().encode()
        if config.rs256_public_key is not None:
            pem = config.rs256_public_key.get_secret_value().encode()
            try:
                self._keys["RS256"] = jwt.algorithms.RSAAlgorithm(
                    jwt.algorithms.RSAAlgorithm.SHA256
                ).prepare_key(pem)
            except (ValueError, jwt.InvalidKeyError) as exc:
                raise ConfigurationError(
                    f"api.jwt.rs256_public_key is not an RSA public key PEM: {exc}"
                ) from None

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`AuthenticationFailed` (``invalid_token``)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("the bearer token is not a JWT") from None
        algorithm = header.get("alg")
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            raise _invalid("the bearer token's algorithm is not accepted")
        required = ["exp"]
        if self._config.issuer is not None:
            required.append("iss")
        if self._config.audience is not None:
            required.append("aud")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_s,
                options={"require": required, "verify_aud": self._config.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("the bearer token has expired") from None
        except jwt.InvalidAudienceError:
            raise _invalid("the bearer token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("the bearer token is from another issuer") from None
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"the bearer token is not valid: {type(exc).__name__}") from None
        return claims


def _invalid(detail: str) -> AuthenticationFailed:
    return AuthenticationFailed("invalid_token", detail, bearer_error="invalid_token")


class Authenticator:
    """Accepts an API key or a bearer JWT; refuses everything else."""

    def __init__(self, api_keys: Mapping[str, SecretStr], jwt_config: JwtSettings) -> None:
        self._keys = ApiKeys(api_keys)
        self._jwt = JwtVerifier(jwt_config)

    def authenticate(self, api_key: str | None, bearer: str | None) -> Principal:
        """The caller; :class:`AuthenticationFailed` for missing or invalid credentials."""
        if api_key:
            client = self._keys.client_for(api_key)
            if client is None:
                raise AuthenticationFailed("invalid_api_key", "the API key is not valid")
            return Principal("api_key", client, {})
        if bearer:
            if not self._jwt.enabled:
                raise _invalid("bearer tokens are not accepted: no JWT key configured")
            claims = self._jwt.verify(bearer)
            return Principal("jwt", str(claims.get("sub", "")), claims)
        raise AuthenticationFailed(
            "missing_credentials", "send an API key in X-API-Key or an OAuth2 bearer token"
        )
