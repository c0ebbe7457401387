"""Security headers on every response: a Content-Security-Policy each page satisfies,
``nosniff``, a referrer policy, and framing allowed for the embeddable player only.

A page's policy names its own inline ``<script>`` and ``<style>`` blocks by SHA-256
(read from the file, so an edited page needs no edit here) instead of allowing inline
code at large: markup injected into a page cannot run script. Everything else a page
loads comes from this origin. Responses that are not pages (JSON, problem documents,
media, static files) get a policy that allows nothing, since none of them is meant to
be rendered as a document.
"""

from __future__ import annotations

import base64
import hashlib
from html.parser import HTMLParser
from pathlib import Path

from aiohttp import web

EMBED_PREFIX = "/embed/"
"""Pages under this path are meant to be framed by any site."""

NOT_A_PAGE = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


class _InlineBlocks(HTMLParser):
    """Collects the text of inline ``<script>`` (no ``src``) and ``<style>`` elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._into: list[str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script" and not dict(attrs).get("src"):
            self._into = self.scripts
        elif tag == "style":
            self._into = self.styles
        self._text = []

    def handle_data(self, data: str) -> None:
        if self._into is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._into is not None and tag in ("script", "style"):
            self._into.append("".join(self._text))
            self._into = None


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_policy(html: str, frameable: bool, connect_anywhere: bool) -> str:
    """The CSP of one page. ``connect_anywhere``: the page's WHIP/WHEP requests may be
    redirected to media nodes on other origins (a signaling-only node), which are known
    only at run time."""
    blocks = _InlineBlocks()
    blocks.feed(html)
    blocks.close()
    scripts = " ".join(["'self'", *sorted({_sha256(s) for s in blocks.scripts})])
    styles = " ".join(["'self'", *sorted({_sha256(s) for s in blocks.styles})])
    directives = [
        "default-src 'none'",
        f"script-src {scripts}",
        f"style-src {styles}",
        "img-src 'self' data:",  # data: for the empty favicon
        "media-src 'self' blob:",  # blob: for LL-HLS through Media Source Extensions
        "connect-src 'self'" + (" http: https:" if connect_anywhere else ""),
        "worker-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'self'",
    ]
    if not frameable:
        directives.append("frame-ancestors 'none'")
    return "; ".join(directives)


class PagePolicies:
    """Each page file's policy, recomputed when the file changes."""

    def __init__(self, connect_anywhere: bool) -> None:
        self.connect_anywhere = connect_anywhere
        self._cache: dict[Path, tuple[int, str]] = {}

    def for_page(self, path: Path, frameable: bool) -> str:
        mtime = path.stat().st_mtime_ns
        cached = self._cache.get(path)
        if cached is None or cached[0] != mtime:
            policy = page_policy(path.read_text(), frameable, self.connect_anywhere)
            cached = self._cache[path] = (mtime, policy)
        return cached[1]


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers every response carries. A page handler sets
    its own policy first; everything else gets :data:`NOT_A_PAGE`."""
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "same-origin"
    headers.setdefault("Content-Security-Policy", NOT_A_PAGE)
    if not request.path.startswith(EMBED_PREFIX):
        headers["X-Frame-Options"] = "DENY"
