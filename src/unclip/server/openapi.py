"""What the OpenAPI document says that FastAPI cannot infer: the error answers of each
route (OpenAI error objects), the bodies the image routes parse by hand (JSON and
multipart), and image file answers."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

__all__ = ["ERRORS", "NOT_FOUND", "V1_ERRORS", "ImageFileResponse", "form_doc", "json_doc"]


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}


def error_docs(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: an OpenAI error object for each (status, text)."""
    return {
        status: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for status, text in codes
    }


#: what an image route may answer besides its images
ERRORS = error_docs(
    (400, "invalid request (bad JSON, bad image, mask mismatch, limits)"),
    (401, "missing or wrong API key"),
    (413, "upload too large"),
    (415, "wrong Content-Type (JSON routes: application/json; uploads: multipart)"),
    (429, "job queue full; see Retry-After"),
    (504, "request timeout"),
)
ERRORS[202] = {"description": "with `Prefer: respond-async`: the queued job"}


class ImageFileResponse(Response):
    """An image file answer (PNG, JPEG or WebP; the route lists the media types)."""

    media_type = "image/png"


#: what any /v1 route may answer besides its own results (the API key, the Host/Origin
#: checks and the body limit apply to every route), and what a lookup by id may answer
V1_ERRORS = error_docs(
    (400, "invalid request (bad parameter, bad Host header)"),
    (401, "missing or wrong API key"),
    (403, "a POST or DELETE from another site (Origin: null or not the server's own)"),
    (413, "request body too large"),
)
NOT_FOUND = error_docs((404, "no such job, gallery image or file (or no gallery)"))


def json_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads a JSON body of ``model``."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def form_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a multipart route: ``model``'s fields and its file fields
    (``model.files``, name: required). A field that may be text or a file
    (``model.text_or_file``) is documented as text, its description saying so."""
    files: dict[str, bool] = getattr(model, "files", {})
    either: tuple[str, ...] = getattr(model, "text_or_file", ())
    schema = model.model_json_schema()
    for name in files:
        if name in either:
            continue
        schema["properties"] = {
            name: {"type": "string", "format": "binary"},
            **schema.get("properties", {}),
        }
    schema["required"] = [*schema.get("required", []), *(n for n, req in files.items() if req)]
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }
