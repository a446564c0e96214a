"""What the OpenAPI document says beyond what FastAPI derives from the routes:

- links between the memory operations: the ids an add returns lead to get, update, delete and
  history, and an item read or updated leads on by its id. Clients may follow them, and
  schemathesis's stateful phase chains requests through them (tests/test_fuzz.py);
- the refusals of every route that takes a JSON body, answered before it runs
  (server/guards.py, app.py): 400 invalid_json, 408 timeout, 413 too_large,
  415 unsupported_media_type.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ITEM = "/v1/memories/{memory_id}"
ITEM_OPERATIONS = {"GetMemory": ("get", ITEM), "UpdateMemory": ("put", ITEM),
                   "DeleteMemory": ("delete", ITEM), "MemoryHistory": ("get", f"{ITEM}/history")}
# (method, path, status) -> (where its response holds a memory id, the operations it leads to)
LINKS: dict[tuple[str, str, str], tuple[str, tuple[str, ...]]] = {
    ("post", "/v1/memories", "201"): ("$response.body#/results/0/id", tuple(ITEM_OPERATIONS)),
    ("get", ITEM, "200"): ("$response.body#/id", ("UpdateMemory", "DeleteMemory",
                                                  "MemoryHistory")),
    ("put", ITEM, "200"): ("$response.body#/id", ("GetMemory", "DeleteMemory",
                                                  "MemoryHistory")),
    ("delete", ITEM, "200"): ("$response.body#/deleted", ("GetMemory", "MemoryHistory")),
}
REFUSALS = {"400": "The body is not JSON (invalid_json), or the library refused a value",
            "408": "The body did not arrive within the body timeout (timeout)",
            "413": "The body is over the size limit (too_large)",
            "415": "The body is not application/json (unsupported_media_type)"}


def install(app: FastAPI) -> None:
    """Have app.openapi() return the document with the links and refusals added."""
    derive = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        document = derive()  # cached by FastAPI after the first call
        if fresh:
            add_links(document)
            add_refusals(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def add_links(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for (method, path, status), (source, targets) in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        response["links"] = {name: _link(paths, name, source) for name in targets
                             if ITEM_OPERATIONS[name][1] in paths}


def _link(paths: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    method, path = ITEM_OPERATIONS[name]
    return {"operationId": paths[path][method]["operationId"],
            "parameters": {"memory_id": source}}


def add_refusals(document: dict[str, Any]) -> None:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for operations in document["paths"].values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" not in content:
                continue
            for status, description in REFUSALS.items():
                operation["responses"].setdefault(status, {"description": description,
                                                           "content": error})
