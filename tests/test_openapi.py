"""The OpenAPI document at /openapi.json: valid OpenAPI 3.1, every documented path is
routed by a full node (and every API route is documented), every error is a problem."""

from __future__ import annotations

import re

import aiohttp
import openapi_spec_validator
from whipcast.signaling.app import make_app

METHODS = {"get", "post", "put", "patch", "delete", "options"}
# Served by whipcast but not part of the HTTP API: pages and their static files.
UNDOCUMENTED = re.compile(r"^/($|web($|/)|studio/|watch/|embed/|publish/|dashboard$)")


async def fetch_document(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "/openapi.json") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        return await r.json()


def _resolve(document: dict, ref: str) -> dict:
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(value) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if "$ref" in value else []
        return found + [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


async def test_document_is_valid_openapi_3_1(server):
    document = await fetch_document(server.url)
    assert document["openapi"].startswith("3.1")
    for ref in _refs(document):
        _resolve(document, ref)  # every $ref points at something
    openapi_spec_validator.validate(document)


async def test_every_documented_path_is_routed_and_every_route_documented(server):
    document = await fetch_document(server.url)
    app = make_app(server.settings)  # the same roles as the server: everything
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }
    assert documented - routed == set(), "documented but not routed"
    api_routes = {(p, m) for p, m in routed if not UNDOCUMENTED.match(p) and m != "*"}
    assert api_routes - documented == set(), "routed but not documented"


async def test_every_documented_error_is_a_problem_document(server):
    document = await fetch_document(server.url)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for status, response in operation["responses"].items():
                if "$ref" in response:
                    response = _resolve(document, response["$ref"])
                if status.startswith(("4", "5")) and path != "/readyz":
                    assert list(response["content"]) == ["application/problem+json"], (
                        path,
                        method,
                        status,
                    )


async def test_errors_are_problem_json_in_practice(server):
    async with aiohttp.ClientSession(base_url=server.url) as session:
        for method, path in [
            ("GET", "/api/streams/not-live-here"),
            ("GET", "/api/streams/bad%20name/questions"),
            ("POST", "/api/streams/x/questions"),
            ("PATCH", "/api/streams/x/questions/short"),
        ]:
            async with session.request(method, path) as response:
                assert 400 <= response.status < 500, path
                assert response.content_type == "application/problem+json", path
                assert (await response.json())["detail"], path
