"""``/openapi.json`` is a valid OpenAPI 3.1 document that names exactly the routes served.

The live behaviour is checked against it by ``tests/test_openapi.py`` (schemathesis);
here, only the document itself: valid, complete, and consistent in its error conventions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import msgspec
import pytest
import schemathesis

from vigil.messages import TaskSpecStrict
from vigil_gateway import openapi
from vigil_gateway.service import PUBLIC, Gateway
from vigil_gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit
METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "trace"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi.document()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def test_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema


def test_every_component_is_a_valid_json_schema(doc: dict[str, Any]) -> None:
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(doc))
    assert "#/components/schemas/ErrorBody" in found
    for ref in found:
        resolve(doc, {"$ref": ref})  # KeyError if dangling


def test_routes_and_paths_match_both_ways(doc: dict[str, Any]) -> None:
    gateway = Gateway(GatewaySettings(auth="none", nats_url="nats://127.0.0.1:1"))
    served = set()
    for route in gateway.app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD to every GET by itself
            continue
        served.add((route.resource.canonical, route.method.lower()))  # type: ignore[union-attr]
    documented = {(path, method) for path, method, _ in operations(doc)}
    assert served == documented, {"undocumented": served - documented,
                                  "not served": documented - served}


def test_security_is_global_bearer_and_public_routes_opt_out(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearer": []}]
    for path, _, op in operations(doc):
        if path in PUBLIC:
            assert op["security"] == [], path
            assert "401" not in op["responses"], path
        else:
            assert "security" not in op, path
            assert "401" in op["responses"], path


def test_error_responses_share_one_shape_and_headers(doc: dict[str, Any]) -> None:
    for path, method, op in operations(doc):
        for status, response in op["responses"].items():
            response = resolve(doc, response)
            if int(status) < 400 or path == "/healthz":
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
            headers = response.get("headers", {})
            if status in ("429", "503"):
                assert "Retry-After" in headers, (path, method, status)
            if status == "401":
                assert "WWW-Authenticate" in headers, (path, method, status)


def test_id_parameters_are_declared_with_the_id_pattern(doc: dict[str, Any]) -> None:
    for path, method, op in operations(doc):
        names = set(re.findall(r"{(\w+)}", path))
        declared = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "path"}
        assert set(declared) == names, (path, method)
        for p in declared.values():
            assert p["required"] is True
            assert p["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"


def test_operation_ids_are_unique(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))


def test_submit_body_schema_agrees_with_the_decoder(doc: dict[str, Any]) -> None:
    """Rules msgspec checks in code (reserved env names, label count) are in the schema."""
    schema = doc["components"]["schemas"]["TaskSpecStrict"]
    registry_doc = {**schema, "components": doc["components"]}
    validator = jsonschema_rs.Draft202012Validator(registry_doc)

    def agree(body: dict[str, Any]) -> tuple[bool, bool]:
        try:
            msgspec.convert(body, TaskSpecStrict)
            decoded = True
        except msgspec.ValidationError:
            decoded = False
        return validator.is_valid(body), decoded

    for body in (
        {"command": ["true"]},
        {"command": ["true"], "env": {"VIGIL_TASK_ID": "x"}},
        {"command": ["true"], "labels": {f"k{i}": "v" for i in range(65)}},
        {"command": ["true"], "labels": {f"k{i}": "v" for i in range(64)}},
        {"command": ["true"], "timeout": 5},
        {"command": []},
    ):
        valid, decoded = agree(body)
        assert valid == decoded, body


async def test_the_route_serves_the_document(doc: dict[str, Any]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    gateway = Gateway(GatewaySettings(auth="none", nats_url="nats://127.0.0.1:1"))
    async with TestClient(TestServer(gateway.app)) as client:
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == doc
