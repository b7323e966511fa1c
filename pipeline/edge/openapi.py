"""The gateway's OpenAPI 3.1 document, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from pipeline.settings import EdgeHttpSettings

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "the first problem, one line"}},
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before sending the same request again",
                "schema": {"type": "integer"},
            }
        }
    return response


def openapi_document(limits: EdgeHttpSettings) -> dict[str, Any]:
    """The document, with the configured limits in its descriptions."""
    reading = {
        "type": "object",
        "description": "A reading; ingest and parse validate it (bad ones are dead-lettered).",
        "properties": {
            "device_id": {"type": "string"},
            "ts": {"type": "integer", "description": "epoch milliseconds"},
            "seq": {"type": "integer", "minimum": 0},
            "metric": {"type": "string"},
            "value": {"type": "number"},
            "unit": {"type": "string"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "iot-pipeline HTTP gateway",
            "version": "1",
            "description": (
                "Readings in: each accepted request's records are acknowledged by Kafka "
                "before the 202. A 429 or 503 means nothing needs to be assumed written: "
                "send the same request again after Retry-After (duplicates are recognised "
                "downstream)."
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Reading": reading,
                "Error": _ERROR,
                "Accepted": {
                    "type": "object",
                    "required": ["accepted"],
                    "properties": {
                        "accepted": {
                            "type": "integer",
                            "description": "records written and acknowledged",
                        }
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/readings": {
                "post": {
                    "operationId": "postReadings",
                    "summary": "Send readings",
                    "description": (
                        f"At most {limits.max_body_bytes} bytes on the wire, "
                        f"{limits.max_decoded_bytes} after gzip, {limits.max_records} records "
                        f"and {limits.max_record_bytes} bytes per record. The body must arrive "
                        f"within {limits.read_timeout_s:g} s. A token bound to a device-id "
                        "prefix may only send readings of devices with that prefix."
                    ),
                    "parameters": [
                        {
                            "name": "Content-Encoding",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "enum": ["gzip", "identity"]},
                        },
                        {
                            "name": "traceparent",
                            "in": "header",
                            "required": False,
                            "description": "W3C trace context, carried on every record",
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Reading"},
                                        {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Reading"},
                                        },
                                    ]
                                }
                            },
                            "application/x-ndjson": {
                                "schema": {"type": "string", "description": "a JSON object a line"}
                            },
                            "text/csv": {
                                "schema": {
                                    "type": "string",
                                    "description": "device_id,ts,seq,metric,value,unit a line",
                                }
                            },
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "every record acknowledged by Kafka",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        "400": _error("the body cannot be split into records"),
                        "401": _error("no token, or an unknown one"),
                        "403": _error("a record of a device outside the token's prefix"),
                        "408": _error("the body did not arrive in time"),
                        "413": _error("over a size or record-count limit"),
                        "415": _error("a Content-Type or Content-Encoding not read here"),
                        "429": _error("too many records waiting for Kafka", retry_after=True),
                        "503": _error("Kafka unreachable or too slow", retry_after=True),
                    },
                }
            },
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "security": [],
                    "responses": {
                        "200": {"description": "serving"},
                        "503": {"description": "not yet serving"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "security": [],
                    "responses": {"200": {"description": "Prometheus text format"}},
                }
            },
        },
    }
