"""The OpenAPI document of one node: its execute calls with that node's typed input and output variables."""

from __future__ import annotations

from typing import Any

from cellnode._version import __version__
from cellnode.runtime.variables import JSON_SCHEMAS
from cellnode.store.models import Node

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A google.rpc.Status: the gRPC code number, a message naming the problem, and details.",
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["code", "message"],
}
ERRORS = {
    "400": "Malformed JSON, or a missing, unknown or mistyped input variable.",
    "401": "Missing or bad credential.",
    "403": "The folder is not in the node's ACL.",
    "404": "Unknown node.",
    "413": "Body over 16 MB.",
    "500": "The cell raised (NodeExecutionErrorDetails in details), or an output is missing or mistyped.",
    "503": "No ready instance.",
    "504": "The request ran past the node's timeout.",
}


def _object(variables: list[dict[str, str]], title: str) -> dict[str, Any]:
    return {
        "title": title,
        "type": "object",
        "properties": {v["name"]: {**JSON_SCHEMAS[v["type"]], "x-cellnode-type": v["type"]} for v in variables},
        "required": [v["name"] for v in variables],
        "additionalProperties": False,
    }


def node_openapi(node: Node) -> dict[str, Any]:
    """OpenAPI 3.1 for POST /datasphere/v1/nodes/{id}:execute and the header form at /."""
    title = "".join(part.capitalize() for part in node.name.split("-"))
    inputs = _object(node.inputs, f"{title}Input")
    outputs = _object(node.outputs, f"{title}Output")
    responses: dict[str, Any] = {
        "200": {
            "description": "The output variables.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExecuteResponse"}}},
        }
    }
    for code, description in ERRORS.items():
        responses[code] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
        }
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": f"Node {node.name}", "version": __version__, "description": node.description},
        "paths": {
            f"/datasphere/v1/nodes/{node.id}:execute": {
                "post": {
                    "operationId": "execute",
                    "summary": f"Run node {node.name}",
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExecuteRequest"}}},
                    },
                    "responses": responses,
                }
            },
            "/": {
                "post": {
                    "operationId": "executeByHeader",
                    "summary": f"Run node {node.name}, routed by the x-node-id header",
                    "security": security,
                    "parameters": [
                        {"name": "x-node-id", "in": "header", "required": True, "schema": {"const": node.id}},
                        {"name": "x-folder-id", "in": "header", "required": True, "schema": {"type": "string"}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{title}Input"}}},
                    },
                    "responses": responses,
                }
            },
        },
        "components": {
            "schemas": {
                f"{title}Input": inputs,
                f"{title}Output": outputs,
                "ExecuteRequest": {
                    "type": "object",
                    "properties": {
                        "folder_id": {"type": "string", "description": "A folder in the node's ACL."},
                        "input": {"$ref": f"#/components/schemas/{title}Input"},
                    },
                    "required": ["folder_id", "input"],
                },
                "ExecuteResponse": {
                    "type": "object",
                    "properties": {"output": {"$ref": f"#/components/schemas/{title}Output"}},
                    "required": ["output"],
                },
                "Status": STATUS_SCHEMA,
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "IAM token"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "Authorization", "description": "Api-Key <key>"},
            },
        },
    }
