"""Corrections to the generated OpenAPI document, so it promises exactly what the service does.

APIFlask derives the document from the schemas; a few facts live outside them: every route with
a JSON body can also answer 400 (unreadable JSON), 413 (too large) and 415 (not JSON) before
validation runs, bodies are required, PATCH needs at least one field, and book ids are 64-bit
positive integers (the custom path converter is documented as a string by default).
"""

from __future__ import annotations

from apiflask import APIFlask

BODY_ERRORS = {
    "400": "Request body is not valid JSON (also: a duplicate key, NaN or Infinity)",
    "413": "Request body is larger than MAX_CONTENT_LENGTH",
    "415": "Content-Type is not application/json",
}
ERROR_REF = {"$ref": "#/components/schemas/HTTPError"}


def register_spec_processor(app: APIFlask, *, max_id: int) -> None:
    @app.spec_processor
    def _correct(spec: dict) -> dict:
        for _path, operations in spec.get("paths", {}).items():
            for operation in operations.values():
                if not isinstance(operation, dict):
                    continue
                body = operation.get("requestBody")
                if body is not None:
                    body["required"] = True
                    for status, description in BODY_ERRORS.items():
                        operation["responses"].setdefault(
                            status,
                            {
                                "description": description,
                                "content": {"application/json": {"schema": ERROR_REF}},
                            },
                        )
                for parameter in operation.get("parameters", []):
                    if parameter.get("in") == "path" and parameter.get("name") == "book_id":
                        parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": max_id}
        patch = spec.get("components", {}).get("schemas", {}).get("BookPatch")
        if patch is not None:
            patch["minProperties"] = 1
        return spec
