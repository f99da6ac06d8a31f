"""Why the collector refuses a request; each refusal becomes one JSON error response."""

from __future__ import annotations

from pipeline.errors import BrokerError, PipelineError


class RequestRejected(PipelineError):
    """A request the collector answers with an error status and ``{"success": false, ...}``.

    ``index`` names the offending event of a batch; ``retry_after_s`` becomes ``Retry-After``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        index: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.index = index
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.index is not None:
            error["index"] = self.index
        return {"success": False, "error": error}


class BrokerUnavailableError(BrokerError):
    """The broker did not acknowledge every message of a request in time, or refused them.

    ``code`` says which: ``queue_full``, ``delivery_failed`` or ``delivery_timeout``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
