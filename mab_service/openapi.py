"""The OpenAPI 3.1 document served at /openapi.json."""

from __future__ import annotations

from typing import Any

from mab_service import __version__

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "Stable machine code, e.g. validation_error."},
        "message": {"type": "string", "description": "What is wrong, for people."},
        "field": {"type": "string", "description": "Where in the body, e.g. candidates[3]."},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


#: Any request may get this from the server itself, before the app sees it (server.GuardedHttpToolsProtocol).
_HEADERS_TOO_LARGE = _error(
    "The request head is larger than max_header_bytes (headers_too_large); the connection is closed."
)


def openapi_document(max_candidates: int, max_body_bytes: int) -> dict[str, Any]:
    """The document for this configuration (limits are part of the contract)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mab-service",
            "version": __version__,
            "description": "Ranks candidates for a user by Thompson samples from Beta posteriors. Every answer "
            "carries X-Request-ID: the client's, when it sends a short printable one, else a new id.",
        },
        "paths": {
            "/predict": {
                "post": {
                    "operationId": "predict",
                    "summary": "Rank candidates by one Thompson sample each",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Ranked candidates, best first.",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/PredictResponse"}}
                            },
                        },
                        "400": _error("The body is not valid JSON."),
                        "408": _error(
                            "The body did not arrive within body_timeout_s of the head (request_timeout); the "
                            "connection is closed."
                        ),
                        "413": _error(f"The body is larger than {max_body_bytes} bytes."),
                        "415": _error("The content type is not application/json."),
                        "422": _error("The JSON does not match PredictRequest."),
                        "431": _HEADERS_TOO_LARGE,
                        "503": {
                            "description": "The feature source failed (feature_source_unavailable) or the worker "
                            "holds as many requests as it admits (overloaded; retry after Retry-After seconds).",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        },
                    },
                }
            },
            "/live": {
                "get": {
                    "operationId": "live",
                    "summary": "Liveness: 200 whenever the worker's event loop answers",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        "431": _HEADERS_TOO_LARGE,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics of every worker",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format, or OpenMetrics if the Accept header asks for it.",
                            "content": {"text/plain": {}, "application/openmetrics-text": {}},
                        },
                        "404": _error("Metrics are off (--no-metrics)."),
                        "431": _HEADERS_TOO_LARGE,
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Readiness: 200 once the kernel and the feature source are ready",
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        "503": {
                            "description": "Not ready, with the reason.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        "431": _HEADERS_TOO_LARGE,
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "PredictRequest": {
                    "type": "object",
                    "required": ["user_id", "candidates"],
                    "properties": {
                        "user_id": {"type": "string", "maxLength": 1024},
                        "candidates": {
                            "type": "array",
                            "items": {"type": "string"},
                            "minItems": 1,
                            "maxItems": max_candidates,
                            "description": "Candidate ids; duplicates are ranked once (first occurrence).",
                        },
                        "top_k": {
                            "type": ["integer", "null"],
                            "minimum": 1,
                            "maximum": 2**64 - 1,
                            "description": "How many to return; all when absent or null, at most the distinct "
                            "candidates.",
                        },
                        "seed": {
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "maximum": 2**64 - 1,
                            "description": "Same seed and inputs, same answer; absent or null draws a fresh seed. "
                            "A seed above 2**53 must be written as an integer literal (no fraction, no exponent).",
                        },
                    },
                },
                "PredictResponse": {
                    "type": "object",
                    "required": ["user_id", "ids", "scores", "degraded"],
                    "properties": {
                        "user_id": {"type": "string"},
                        "ids": {"type": "array", "items": {"type": "string"}},
                        "scores": {
                            "type": "array",
                            "items": {"type": "number", "minimum": 0, "maximum": 1},
                            "description": "Each id's Thompson sample, descending.",
                        },
                        "degraded": {
                            "type": "boolean",
                            "description": "Some candidates were ranked by the prior because the feature store "
                            "could not be read in time (on_store_failure = degrade).",
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
                },
                "Error": _ERROR,
            }
        },
    }
