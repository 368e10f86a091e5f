"""The OpenAPI 3.1 document served at /openapi.json."""

from __future__ import annotations

from typing import Any

from mab_service import __version__
from mab_service.ids import (
    EVENT_ID_PATTERN,
    ID_PATTERN,
    ID_RULE,
    MAX_ID_BYTES,
    MAX_SEGMENT_BYTES,
    MIN_ID_BYTES,
    SEGMENT_RULE,
)
from mab_service.routes import PROBES

#: An id (candidate, reward id) by the id rule: JSON Schema counts characters, so maxLength is the byte limit (a
#: character is at least one byte) and the description states the rule in bytes; the pattern excludes controls.
_ID = {
    "type": "string",
    "minLength": MIN_ID_BYTES,
    "maxLength": MAX_ID_BYTES,
    "pattern": ID_PATTERN,
}
_EVENT_ID = {"type": "string", "pattern": EVENT_ID_PATTERN}
#: A segment as JSON Schema can say it, as for ids: ``maxLength`` counts characters, the text states the byte limit.
_SEGMENT = {
    "type": "string",
    "minLength": MIN_ID_BYTES,
    "maxLength": MAX_SEGMENT_BYTES,
    "pattern": ID_PATTERN,
    "description": f"A segment: {SEGMENT_RULE}.",
}
_SEGMENT_QUERY = {
    "name": "segment",
    "in": "query",
    "schema": _SEGMENT,
    "description": "Within this segment, as /predict ranks for it: the arm's global posterior mean worth "
    "--segment-prior-weight impressions, plus its counts in the segment.",
}

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


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _status(description: str) -> dict[str, Any]:
    schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    return _json(description, schema)


#: Any request may get this from the server itself, before the app sees it (http.protocol.GuardedHttpToolsProtocol).
_HEADERS_TOO_LARGE = _error(
    "The request head is larger than max_header_bytes (headers_too_large); the connection is closed."
)


#: How a client authenticates when the service runs with ``api_keys_file``: one of the keys in that file.
_BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key from the service's api_keys_file, sent as `Authorization: Bearer <key>`. Needed only "
    "when the service runs with api_keys_file (off by default); the probes and the dashboard's page never need it.",
}
_UNAUTHORIZED = {
    **_error("No known API key (unauthorized): only when the service runs with api_keys_file."),
    "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
}
_OVERLOADED = {
    **_error("The worker holds as many requests as it admits (overloaded); retry after Retry-After seconds."),
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}


def openapi_document(max_candidates: int, max_body_bytes: int) -> dict[str, Any]:
    """The document for this configuration (limits are part of the contract), with the optional bearer key and the
    answers every admitted path may give (401, 503) on all paths but the probes (``routes.PROBES``)."""
    document = _document(max_candidates, max_body_bytes)
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if path not in PROBES:
                responses.setdefault("503", _OVERLOADED)
                # Either no credentials (the default: keys off) or a bearer key: the key is optional in the contract.
                operation["security"] = [{}, {"bearer": []}]
                responses["401"] = _UNAUTHORIZED
    document["components"]["securitySchemes"] = {"bearer": _BEARER}
    return document


def _document(max_candidates: int, max_body_bytes: int) -> dict[str, Any]:
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
                        "409": _error(
                            "The client's event_id is still held by an earlier answer (event_id_in_use); in fleet "
                            "mode, held on any replica."
                        ),
                        "422": _error(
                            "The JSON does not match PredictRequest, or it has a segment where segments are not "
                            "ranked (segments_unavailable: the loop off over the embedded table, a fleet replica not "
                            "following the fan-out)."
                        ),
                        "429": {
                            "description": "The client holds its share of the node's held events (too_many_events, "
                            "max_client_share): retry after Retry-After seconds; or it has added its share of the "
                            "node's room for new arms (too_many_new_arms, no Retry-After: put them in the catalogue). "
                            "Nothing was held or counted.",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        },
                        "431": _HEADERS_TOO_LARGE,
                        "503": {
                            "description": "The feature source failed (feature_source_unavailable), the worker "
                            "holds as many requests as it admits (overloaded; retry after Retry-After seconds), or, "
                            "in fleet mode, the answer's event could not be kept (events_unavailable).",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        },
                    },
                }
            },
            "/reward": {
                "post": {
                    "operationId": "reward",
                    "summary": "Credit an arm that an answer returned; counted once per (event_id, id)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RewardRequest"}}},
                    },
                    "responses": {
                        "202": _status("Accepted: on disk, and in the next answers of every worker."),
                        "200": _status("A duplicate of an accepted reward: counted once."),
                        "400": _error("The body is not valid JSON."),
                        "404": _error(
                            "No such event is held (unknown_event: never answered, or older than the reward "
                            "window), or the learning loop is off (learning_off)."
                        ),
                        "408": _error("The body did not arrive within body_timeout_s of the head."),
                        "413": _error(f"The body is larger than {max_body_bytes} bytes."),
                        "415": _error("The content type is not application/json."),
                        "422": _error(
                            "The JSON does not match RewardRequest (validation_error), or the event's answer did "
                            "not return this id (not_in_event)."
                        ),
                        "431": _HEADERS_TOO_LARGE,
                        "503": _error(
                            "The journal cannot record durably now (journal_unavailable: full or read-only disk), "
                            "or the worker is overloaded, or in fleet mode Pub/Sub did not store it "
                            "(events_unavailable) or Bigtable cannot be read (bigtable_unavailable); nothing was "
                            "counted, retry later (a retry is counted once)."
                        ),
                    },
                }
            },
            "/rewards": {
                "post": {
                    "operationId": "rewards",
                    "summary": "Many rewards in one request and one group commit, with a result per reward",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["rewards"],
                                    "properties": {
                                        "rewards": {
                                            "type": "array",
                                            "minItems": 1,
                                            "maxItems": 10000,
                                            "items": {"$ref": "#/components/schemas/RewardRequest"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            "One result per reward, in order, once the accepted ones are on disk: {status: accepted}, "
                            "{status: duplicate}, or an error object (unknown_event, not_in_event).",
                            {"type": "object", "required": ["results"]},
                        ),
                        "400": _error("The body is not valid JSON."),
                        "404": _error("The learning loop is off (learning_off)."),
                        "408": _error("The body did not arrive within body_timeout_s of the head."),
                        "413": _error(f"The body is larger than {max_body_bytes} bytes."),
                        "415": _error("The content type is not application/json."),
                        "422": _error("A reward does not match RewardRequest; field names it (rewards[3].reward)."),
                        "431": _HEADERS_TOO_LARGE,
                        "503": _error(
                            "The journal cannot record durably now (journal_unavailable): none of the batch was "
                            "counted; or the worker is overloaded; or in fleet mode Pub/Sub or Bigtable is away "
                            "(events_unavailable, bigtable_unavailable). Retry the whole batch: each reward is "
                            "counted once."
                        ),
                    },
                }
            },
            "/arms": {
                "get": {
                    "operationId": "arms",
                    "summary": "The leading arms with their posteriors and 95% intervals",
                    "parameters": [
                        {"name": "top", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {
                            "name": "order",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["impressions", "rewards", "mean"]},
                        },
                        _SEGMENT_QUERY,
                    ],
                    "responses": {
                        "200": _json(
                            "The leading arms; in fleet mode from the table's first 10,000 arms, with `partial` "
                            "true when it holds more.",
                            {"type": "object", "required": ["arms", "total"]},
                        ),
                        "404": _error("The learning loop is off (learning_off)."),
                        "422": _error(
                            "A bad top, order or segment, or a segment where segments are not counted "
                            "(segments_unavailable: a fleet replica not following the fan-out)."
                        ),
                        "431": _HEADERS_TOO_LARGE,
                    },
                }
            },
            "/arms/{id}": {
                "get": {
                    "operationId": "arm",
                    "summary": "One arm's posterior and counts as the service sees it now",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                        _SEGMENT_QUERY,
                    ],
                    "responses": {
                        "200": _json("The arm.", {"$ref": "#/components/schemas/Arm"}),
                        "404": _error("Never shown, and the feature source does not know it (unknown_arm)."),
                        "422": _error(
                            "A bad segment, or a segment where segments are not counted (segments_unavailable)."
                        ),
                        "431": _HEADERS_TOO_LARGE,
                    },
                }
            },
            "/loop": {
                "get": {
                    "operationId": "loop",
                    "summary": "The learning loop's health: events held, rewards, refusals",
                    "responses": {
                        "200": _json("The loop's state.", {"type": "object", "required": ["learning"]}),
                        "431": _HEADERS_TOO_LARGE,
                    },
                }
            },
            "/dashboard": {
                "get": {
                    "operationId": "dashboard",
                    "summary": "A page of the arms' posteriors and the loop's health",
                    "responses": {
                        "200": {"description": "HTML.", "content": {"text/html": {}}},
                        "431": _HEADERS_TOO_LARGE,
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
                            "items": {**_ID, "description": f"An id: {ID_RULE}."},
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
                        "event_id": {
                            "type": ["string", "null"],
                            "pattern": EVENT_ID_PATTERN,
                            "description": "The client's own event id for this answer (409 while one with that id "
                            "is held); absent or null, the service makes one.",
                        },
                        "segment": {
                            **_SEGMENT,
                            "type": ["string", "null"],
                            "description": f"The audience to rank for ({SEGMENT_RULE}): each candidate is drawn "
                            "from its counts within the segment, backed off to its global posterior mean; absent or "
                            "null ranks globally.",
                        },
                    },
                },
                "RewardRequest": {
                    "type": "object",
                    "required": ["event_id", "id"],
                    "properties": {
                        "event_id": _EVENT_ID,
                        "id": {**_ID, "description": f"An id the event's answer returned: {ID_RULE}."},
                        "reward": {"type": "number", "minimum": 0, "maximum": 1, "default": 1},
                    },
                },
                "Arm": {
                    "type": "object",
                    "required": ["id", "alpha", "beta", "impressions", "rewards"],
                    "properties": {
                        "id": {"type": "string"},
                        "segment": {"type": "string", "description": "With ?segment=: the segment."},
                        "alpha": {"type": "number", "description": "alpha0 + rewards"},
                        "beta": {"type": "number", "description": "beta0 + max(impressions - rewards, 0)"},
                        "impressions": {
                            "type": "number",
                            "description": "An integer; with --half-life-s, the weighted impressions.",
                        },
                        "rewards": {"type": "number"},
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
                        "event_id": {
                            "type": "string",
                            "description": "This answer's event (with the learning loop on): post rewards for its "
                            "ids to /reward with it. Each id returned is one impression.",
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
