"""Domain errors. Each carries its HTTP status, a stable machine code and a message for the client;
``http.errors.error_answer`` turns them into JSON answers, in one place."""

from __future__ import annotations


class MabError(Exception):
    """Base of every error this service raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, str]:
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class MalformedBody(MabError):
    status_code = 400
    code = "malformed_json"


class PayloadTooLarge(MabError):
    status_code = 413
    code = "payload_too_large"


class RequestTimeout(MabError):
    """A request body that did not arrive within ``body_timeout_s``; answered by the server (http/protocol.py)."""

    status_code = 408
    code = "request_timeout"


class HeadersTooLarge(MabError):
    """A request head larger than ``max_header_bytes``; answered by the server (http/protocol.py)."""

    status_code = 431
    code = "headers_too_large"


class Unauthorized(MabError):
    """A request without a known API key while ``api_keys_file`` is set; answered with ``WWW-Authenticate: Bearer``
    (http/errors.py)."""

    status_code = 401
    code = "unauthorized"


class UnsupportedMediaType(MabError):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(MabError):
    status_code = 422
    code = "validation_error"


class FeatureSourceError(MabError):
    """The feature source cannot be used: bad configuration, a file that does not load, a store that fails."""

    status_code = 503
    code = "feature_source_unavailable"


class Overloaded(MabError):
    """The worker holds as many requests as ``max_in_flight`` allows; the client should retry after
    ``retry_after_s``."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LearningOff(MabError):
    """A loop endpoint while the learning loop is off."""

    status_code = 404
    code = "learning_off"


class SegmentsUnavailable(MabError):
    """A request with a ``segment`` where segment counts are not kept: a Vertex source, the loop off, or a fleet replica
    that does not follow the fan-out. Refused rather than ranked by the global posteriors, so that a client never takes
    one for the other."""

    status_code = 422
    code = "segments_unavailable"
