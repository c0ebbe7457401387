"""Security headers: every response says ``nosniff``; pages carry a Content-Security-
Policy that names their inline code by hash; only ``/embed/`` may be framed. The browser
test checks that the pages, in use, break none of it (and that the studio's "Automatic"
codec publishes H.264)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import uuid

import aiohttp
import pytest
from whipcast.signaling.security import NOT_A_PAGE, page_policy

from .browser_harness import ARTIFACTS, NEEDS_CHROMIUM, run_script

PAGES = ["/", "/studio/demo", "/watch/demo", "/dashboard"]
NOT_PAGES = [
    "/api/streams",
    "/api/streams/not-live",
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/web/whip.js",
    "/web/style.css",
    "/watch/bad%20name",
]


def _directives(policy: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in policy.split("; ")}


async def _get(server, path: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http, http.get(server.url + path) as response:
        await response.read()
        return response


@pytest.mark.parametrize("path", PAGES)
async def test_pages_forbid_framing_and_foreign_code(server, path: str) -> None:
    response = await _get(server, path)
    assert response.status == 200 and response.content_type == "text/html"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"
    policy = _directives(response.headers["Content-Security-Policy"])
    assert policy["default-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in policy["script-src"] + policy["style-src"]
    assert "'unsafe-eval'" not in policy["script-src"]
    assert policy["connect-src"] == ["'self'"]  # this node serves WHIP and WHEP itself


async def test_embed_may_be_framed_by_any_site(server) -> None:
    response = await _get(server, "/embed/demo")
    assert response.status == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "X-Frame-Options" not in response.headers
    policy = _directives(response.headers["Content-Security-Policy"])
    assert "frame-ancestors" not in policy
    assert policy["default-src"] == ["'none'"]


@pytest.mark.parametrize("path", NOT_PAGES)
async def test_other_responses_are_not_documents(server, path: str) -> None:
    response = await _get(server, path)
    assert response.headers["X-Content-Type-Options"] == "nosniff", response.status
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Security-Policy"] == NOT_A_PAGE


def test_policy_names_each_inline_block_by_hash() -> None:
    script, style = "\n  let a = 1;\n", "p { color: red }"
    html = (
        f"<html><head><style>{style}</style><script src='/web/x.js'></script></head>"
        f"<body><script type='module'>{script}</script></body></html>"
    )
    policy = _directives(page_policy(html, frameable=False, connect_anywhere=False))

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert policy["script-src"] == ["'self'", sha(script)]  # the src= script adds nothing
    assert policy["style-src"] == ["'self'", sha(style)]
    assert policy["frame-ancestors"] == ["'none'"]


def test_signaling_only_pages_may_follow_redirects_to_media_nodes() -> None:
    """WHIP/WHEP POSTs are redirected to media nodes on origins known only at run time."""
    policy = _directives(page_policy("<p>", frameable=True, connect_anywhere=True))
    assert policy["connect-src"] == ["'self'", "http:", "https:"]
    assert "frame-ancestors" not in policy


@pytest.mark.timeout(150)
@NEEDS_CHROMIUM[0]
@NEEDS_CHROMIUM[1]
async def test_pages_in_chromium_break_no_policy_and_studio_prefers_h264(server) -> None:
    stream = f"policy-{uuid.uuid4().hex[:8]}"
    shots = ARTIFACTS / "page-policy"
    shutil.rmtree(shots, ignore_errors=True)
    args = [server.url, stream, str(shots)]
    if server.settings.publish_token:
        args += ["--token", server.settings.publish_token]

    code, result, stderr = await run_script("page_policy.mjs", *args, timeout=120)

    assert result is not None, f"no JSON result (exit {code})\n{stderr}"
    assert code == 0 and result["ok"], f"{result.get('error')}\n{stderr}"
    assert result["violations"] == {
        page: [] for page in ("studio", "watch", "embed", "index", "dashboard")
    }
    assert result["framing"] == {"embed": True, "watch": False}
    # "Automatic" left alone, Chromium (whose own first choice is VP8) sends H.264.
    assert result["codecSelect"] == ""
    assert result["automaticCodec"].lower() == "h264", result
    assert "h264" in str(result["streamVideo"]).lower(), result
