"""The collector never writes a write key or a clear e-mail address into its log records."""

from __future__ import annotations

import base64
import logging

import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from pipeline.collector.app import create_app
from pipeline.collector.config import DEV_WRITE_KEYS, CollectorSettings
from pipeline.collector.publish import MemoryPublisher
from pipeline.devkeys import warn_if_dev_key_exposed
from pipeline.settings import Settings

WRITE_KEY = "wk_SECRET_do_not_log_4f1c"
EMAIL = "lea.secret.martin@example.com"


def _settings(**collector: object) -> Settings:
    return Settings(
        _env_file=None,
        collector=CollectorSettings(write_keys={"web": SecretStr(WRITE_KEY)}, **collector),
    )


def _identify(message_id: str, **extra: object) -> dict[str, object]:
    return {
        "type": "identify",
        "messageId": message_id,
        "userId": EMAIL,
        "traits": {"email": EMAIL, "firstName": "Léa"},
        **extra,
    }


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the records say: formatted messages, raw args and tracebacks."""
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


def _assert_clean(text: str) -> None:
    assert text, "the requests were logged at all"
    for secret in (WRITE_KEY, EMAIL, base64.b64encode(f"{WRITE_KEY}:".encode()).decode()):
        assert secret not in text


def test_requests_accepted_and_refused_log_neither_key_nor_email(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    publisher = MemoryPublisher()
    with TestClient(create_app(_settings(), lambda: publisher)) as http:
        assert (
            http.post("/v1/identify", json=_identify("m1"), auth=(WRITE_KEY, "")).status_code == 200
        )
        body = {"batch": [_identify("m2")], "writeKey": WRITE_KEY}
        assert http.post("/v1/batch", json=body).status_code == 200
        wrong = http.post("/v1/identify", json=_identify("m3"), auth=(WRITE_KEY + "x", ""))
        assert wrong.status_code == 401
        in_body = http.post("/v1/identify", json=_identify("m4", writeKey=WRITE_KEY + "y"))
        assert in_body.status_code == 401
        bad = f'{{"writeKey": "{WRITE_KEY}", "email": "{EMAIL}", '.encode()
        assert http.post("/v1/track", content=bad, auth=(WRITE_KEY, "")).status_code == 400
        no_type = {"batch": [{"messageId": "m5", "userId": EMAIL, "type": EMAIL}]}
        assert http.post("/v1/batch", json=no_type, auth=(WRITE_KEY, "")).status_code == 400
        oversize = _identify("m6", traits={"email": EMAIL, "bio": "x" * 40_000})
        refused = http.post("/v1/identify", json=oversize, auth=(WRITE_KEY, ""))
        assert refused.status_code == 400
    assert len(publisher.sent) == 2
    assert all(WRITE_KEY.encode() not in value for _, _, value in publisher.sent)
    assert any(EMAIL.encode() in value for _, _, value in publisher.sent), "data flows on"
    _assert_clean(_logged(caplog))


def test_broker_outage_and_rate_limits_log_neither_key_nor_email(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    down = MemoryPublisher(available=False)
    with TestClient(create_app(_settings(), lambda: down)) as http:
        response = http.post("/v1/identify", json=_identify("m7"), auth=(WRITE_KEY, ""))
        assert response.status_code == 503
    limited = MemoryPublisher()
    app = create_app(_settings(rate_limit_events_per_s=1.0, rate_limit_burst=1), lambda: limited)
    with TestClient(app) as http:
        statuses = [
            http.post("/v1/identify", json=_identify(f"r{i}"), auth=(WRITE_KEY, "")).status_code
            for i in range(3)
        ]
    assert 429 in statuses
    _assert_clean(_logged(caplog))


def test_dev_key_warning_names_the_host_not_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(
        _env_file=None, collector=CollectorSettings(host="0.0.0.0", write_keys=DEV_WRITE_KEYS)
    )
    cfg = settings.collector
    assert warn_if_dev_key_exposed(
        "collector", cfg.host, cfg.write_keys, DEV_WRITE_KEYS["local"], "PIPELINE_COLLECTOR__KEYS"
    )
    text = _logged(caplog)
    assert "0.0.0.0" in text
    assert DEV_WRITE_KEYS["local"].get_secret_value() not in text


def test_secrets_in_settings_are_masked_in_their_repr() -> None:
    settings = _settings()
    shown = repr(settings) + str(settings.model_dump())
    assert WRITE_KEY not in shown
    assert WRITE_KEY not in orjson.dumps(settings.model_dump(mode="json")).decode()
