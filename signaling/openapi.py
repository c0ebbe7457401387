"""The HTTP API described in OpenAPI 3.1, served at ``/openapi.json``.

Written by hand next to the handlers rather than generated from them: the document
is the contract for clients, and ``tests/test_openapi.py`` checks that it is valid and
that every path it names is routed. Every documented error is an RFC 9457 problem.
"""

from __future__ import annotations

from aiohttp import web

PROBLEM = "application/problem+json"
JSON = "application/json"
SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"

_REASONS = {
    400: "The request is malformed; `detail` says how",
    401: "The publish token is missing or wrong",
    403: "A signed URL (`exp`, `sig`) is missing, wrong or expired",
    404: "No such stream, session or question",
    409: "Conflicts with the current state (stream busy, not live, question limit)",
    412: "If-Match does not match the session's ETag",
    413: "The body is too large",
    415: "Wrong Content-Type, or (HLS) a codec HLS cannot carry, such as VP8",
    422: "Well-formed, but asks for something whipcast does not do",
    429: "Too many requests from this client or its address; wait `Retry-After` seconds",
    503: "Kafka or capacity is unavailable; try again after `Retry-After` seconds",
}


def _problem(status: int, reason: str) -> dict:
    response: dict = {"description": reason, "content": {PROBLEM: {"schema": _ref("Problem")}}}
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"description": "Seconds to wait",
                                               "schema": {"type": "integer"}}}  # fmt: skip
    return response


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _param(name: str, description: str, pattern: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": pattern}}  # fmt: skip


STREAM = _param("stream", "Stream name", "^[A-Za-z0-9_-]{1,64}$")
RESOURCE = _param("resource", "Session resource id from `Location`", "^[A-Za-z0-9_-]+$")
QUESTION = _param("question", "Question id", "^[A-Za-z0-9_-]{22}$")
HOST = [{"publishToken": []}]
HOST_VIEW = {"name": "view", "in": "query", "required": False,
             "description": "`host` includes hidden questions; needs the publish token",
             "schema": {"type": "string", "enum": ["host"]}}  # fmt: skip
SEE_OTHER = {"description": "Placed on another node: re-send the offer to `Location` "
             "(RFC 9725 4.5); only from nodes without the media role"}  # fmt: skip
EMPTY = {"description": "Done"}


def _session_endpoint(kind: str, protocol: str, auth: bool) -> dict:
    created = {
        "description": f"{protocol} session created; the body is the SDP answer",
        "headers": {
            "Location": {"description": "Session resource URL", "schema": {"type": "string"}},
            "ETag": {
                "description": "Strong entity tag of the ICE session",
                "schema": {"type": "string"},
            },  # fmt: skip
            "Link": {
                "description": 'STUN/TURN servers, `rel="ice-server"`',
                "schema": {"type": "string"},
            },  # fmt: skip
        },
        "content": {SDP: {"schema": {"type": "string"}}},
    }
    post = {
        "tags": [protocol],
        "summary": f"Start {kind}: POST an SDP offer",
        "requestBody": {"required": True, "content": {SDP: {"schema": {"type": "string"}}}},
        "responses": {
            "201": created,
            "307": SEE_OTHER,
            **_errors(400, 401, 404, 409, 413, 415, 422, 503),
        },  # fmt: skip
    }
    if auth:
        post["security"] = HOST
    else:
        post["responses"].pop("401")
    return {
        "parameters": [STREAM],
        "post": post,
        "options": {
            "tags": [protocol],
            "summary": "CORS preflight and capabilities",
            "responses": {"204": EMPTY},
        },  # fmt: skip
    }


def _session_resource(protocol: str, auth: bool) -> dict:
    patch = {
        "tags": [protocol],
        "summary": "Trickle ICE candidates (ICE restarts are refused with 422)",
        "parameters": [
            {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
        ],  # fmt: skip
        "requestBody": {"required": True, "content": {SDPFRAG: {"schema": {"type": "string"}}}},
        "responses": {"204": EMPTY, **_errors(400, 401, 404, 412, 413, 415, 422)},
    }
    delete = {"tags": [protocol], "summary": "End the session",
              "responses": {"200": EMPTY, **_errors(401, 404)}}  # fmt: skip
    for operation in (patch, delete):
        if auth:
            operation["security"] = HOST
        else:
            operation["responses"].pop("401")
    return {
        "parameters": [STREAM, RESOURCE],
        "patch": patch,
        "delete": delete,
        "options": {
            "tags": [protocol],
            "summary": "CORS preflight",
            "responses": {"204": EMPTY},
        },  # fmt: skip
    }


SCHEMAS: dict = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details; `detail` is written for people",
        "required": ["title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
    "Codec": {
        "type": "object",
        "properties": {
            "mimeType": {"type": "string", "examples": ["video/H264"]},
            "clockRate": {"type": "integer"},
            "channels": {"type": ["integer", "null"]},
            "parameters": {"type": "object"},
        },
    },
    "ViewerStatus": {
        "type": "object",
        "properties": {
            "stream": {"type": "string"},
            "video": {"type": "string", "enum": ["live", "reduced", "paused"]},
            "reason": {"type": ["string", "null"], "description": "Why not live"},
            "layer": {
                "type": ["integer", "null"],
                "description": "Simulcast layer sent (0: the best); null for a single layer",
            },
            "layers": {"type": "integer", "description": "Simulcast layers the stream has"},
            "layer_width": {"type": ["integer", "null"]},
            "layer_height": {"type": ["integer", "null"]},
            "layer_switches": {"type": "integer"},
            "estimate_kbps": {"type": ["integer", "null"], "description": "Bandwidth estimate"},
            "sent_kbps": {"type": ["integer", "null"]},
            "loss": {"type": ["number", "null"], "description": "Share of packets lost"},
            "frames_sent": {"type": "integer"},
            "pauses": {"type": "integer"},
        },
    },
    "Stream": {
        "type": "object",
        "required": ["stream", "live", "viewers", "uptime_s"],
        "properties": {
            "stream": {"type": "string"},
            "live": {"type": "boolean"},
            "title": {"type": ["string", "null"]},
            "width": {"type": ["integer", "null"], "description": "As reported by the host"},
            "height": {"type": ["integer", "null"]},
            "viewers": {"type": "integer", "description": "Viewers on all egress nodes"},
            "started_at": {"type": "number", "description": "Unix time the broadcast began"},
            "uptime_s": {"type": "number"},
            "video": {"oneOf": [_ref("Codec"), {"type": "null"}]},
            "audio": {"oneOf": [_ref("Codec"), {"type": "null"}]},
        },
    },
    "Details": {
        "type": "object",
        "description": "JSON merge patch of the stream's details; `null` clears a field",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "title": {"type": ["string", "null"], "maxLength": 100},
            "width": {"type": ["integer", "null"], "minimum": 1, "maximum": 16384},
            "height": {"type": ["integer", "null"], "minimum": 1, "maximum": 16384},
        },
    },
    "Question": {
        "type": "object",
        "required": ["id", "name", "text", "created_at", "votes", "pinned", "answered"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "text": {"type": "string"},
            "created_at": {"type": "number", "description": "Unix time"},
            "stream_time": {
                "type": ["number", "null"],
                "description": "Seconds into the broadcast when asked",
            },
            "votes": {"type": "integer"},
            "pinned": {"type": "boolean"},
            "answered": {"type": "boolean"},
            "hidden": {"type": "boolean", "description": "Only hosts ever see true"},
            "voted": {"type": "boolean", "description": "Whether this client voted"},
        },
    },  # fmt: skip
    "QuestionList": {
        "type": "object",
        "properties": {
            "stream": {"type": "string"},
            "open": {"type": "boolean", "description": "Whether new questions are taken"},
            "questions": {"type": "array", "items": _ref("Question")},
        },
    },
    "NewQuestion": {
        "type": "object",
        "additionalProperties": False,
        "required": ["text"],
        "properties": {
            "name": {"type": "string", "maxLength": 40, "description": "Default: Anonymous"},
            "text": {"type": "string", "minLength": 1, "maxLength": 500},
        },
    },
    "Moderation": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "pinned": {"type": "boolean", "description": "Pinning unpins the previous one"},
            "answered": {"type": "boolean"},
            "hidden": {"type": "boolean"},
        },
    },
}

SCHEMAS.update({
    "Position": {
        "type": "object",
        "description": "Where a WHEP session is in the broadcast (times in ms since the epoch "
                       "of the frames' ingest arrival)",
        "required": ["position", "live_edge", "window_start", "live", "paused", "ended"],
        "properties": {
            "position": {"type": "integer", "description": "The moment playing now"},
            "live_edge": {"type": "integer", "description": "Newest moment: now while live, "
                                                            "the end of an ended broadcast"},
            "window_start": {"type": "integer", "description": "Oldest moment still in Kafka "
                                                               "(retention)"},
            "live": {"type": "boolean", "description": "Playing at the live edge"},
            "paused": {"type": "boolean"},
            "ended": {"type": "boolean", "description": "A replay reached the end of the "
                      "recording; the server closes the session (RTCP BYE) "
                      "`replay_end_grace_s` (3 s) later, after which this resource is 404"},
            "session": {"type": "string", "description": "Publish session being played (hex)"},
        },
    },
    "Move": {
        "type": "object",
        "description": "Exactly one field. The picture changes within 500 ms, starting on a "
                       "keyframe at or before the target; no renegotiation",
        "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
        "properties": {
            "seek": {"type": "number", "description": "Seconds from the current position "
                                                      "(negative: back)"},
            "at": {"type": "number", "description": "Epoch ms to play from"},
            "live": {"type": "boolean", "const": True, "description": "Back to the live edge"},
            "paused": {"type": "boolean", "description": "Pause (the connection stays up) or "
                                                         "resume where paused"},
        },
    },
    "OutOfWindow": {
        "type": "object",
        "description": "A Problem with the window Kafka holds, for clamping",
        "allOf": [_ref("Problem")],
        "properties": {"window_start": {"type": "integer"}, "live_edge": {"type": "integer"}},
    },
    "Recording": {
        "type": "object",
        "description": "One file of a recorded publish session (a session may have several "
                       "parts: rolled by size or duration, or continued by another recorder)",
        "required": ["stream", "session", "part", "start", "size", "url", "content_type",
                     "end", "duration", "complete"],
        "properties": {
            "stream": {"type": "string"},
            "session": {"type": "string", "description": "Publish session id (hex)"},
            "part": {"type": "integer", "minimum": 1},
            "start": {"type": "number", "description": "Unix time of the part's first keyframe"},
            "end": {"type": ["number", "null"],
                    "description": "Unix time of its last frame; null while it is written "
                                   "or if its recorder stopped without finishing it"},
            "duration": {"type": ["number", "null"], "description": "Seconds"},
            "complete": {"type": "boolean"},
            "size": {"type": "integer", "description": "Bytes on disk now"},
            "file": {"type": "string"},
            "url": {"type": "string", "description": "The file (Range requests allowed)"},
            "content_type": {"type": "string", "enum": ["video/mp4", "video/webm"]},
        },
    },
    "Replay": {
        "type": "object",
        "required": ["stream", "session", "started", "ended", "duration", "thumbnail"],
        "properties": {
            "stream": {"type": "string"},
            "session": {"type": "string", "description": "Pass as `?session=` to WHEP"},
            "live": {"type": "boolean", "const": False},
            "title": {"type": ["string", "null"]},
            "started": {"type": "number", "description": "Unix time the broadcast began"},
            "ended": {"type": "number", "description": "Unix time it ended"},
            "duration": {"type": "number", "description": "Seconds"},
            "available_from": {"type": "number",
                               "description": "Unix time of the oldest moment still in Kafka"},
            "thumbnail": {"type": "string", "description": "URL of a still image"},
            "video": {"oneOf": [_ref("Codec"), {"type": "null"}]},
            "audio": {"oneOf": [_ref("Codec"), {"type": "null"}]},
        },
    },
})  # fmt: skip

_STREAMS = {
    "type": "object",
    "properties": {
        "streams": {"type": "array", "items": {"oneOf": [_ref("Stream"), _ref("Replay")]}}
    },
}
_STATE = {"name": "state", "in": "query", "required": False,
          "description": "`live` (default) or `ended`: broadcasts still playable as replays",
          "schema": {"type": "string", "enum": ["live", "ended"]}}  # fmt: skip
_START = {"name": "start", "in": "query", "required": False,
          "description": "Start in the past: seconds before the live edge (`-30`), epoch "
                         "milliseconds, or an ISO 8601 date with a time zone. Playback "
                         "begins on the keyframe at or before that point, in real time. "
                         "Also plays an ended broadcast still in Kafka; out of the window: "
                         "422 with `window_start` and `live_edge`",
          "schema": {"type": "string"}}  # fmt: skip
_SESSION = {"name": "session", "in": "query", "required": False,
            "description": "Which broadcast of this name (hex id from `/api/streams?state=ended`)",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{1,8}$"}}  # fmt: skip
_POSITION = {
    "parameters": [STREAM, RESOURCE],
    "get": {"tags": ["WHEP"], "summary": "Where the session is in the broadcast",
            "responses": {"200": _json(_ref("Position"), "The position"), **_errors(404)}},
    "post": {
        "tags": ["WHEP"], "summary": "Seek, pause/resume or go back to live",
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Move")}}},
        "responses": {
            "200": _json(_ref("Position"), "The new position"),
            **_errors(400, 404, 413, 415),
            "422": {"description": "Target outside the window (body has the window)",
                    "content": {PROBLEM: {"schema": _ref("OutOfWindow")}}},
            **_errors(503),
        },
    },
    "options": {"tags": ["WHEP"], "summary": "CORS preflight", "responses": {"204": EMPTY}},
}  # fmt: skip
_ACCEPTED = _json({"type": "object"}, "Saved in Kafka, not yet visible on this node")
_CLIENT = [{"clientCookie": []}, {}]  # optional: a request without one gets one
_SET_COOKIE = {
    "Set-Cookie": {
        "description": "`whipcast_client`, when the request had no valid one",
        "schema": {"type": "string"},
    }
}
_FIRST_WRITE = (
    "Needs no earlier read: without a valid `whipcast_client` cookie the "
    "answer sets a new one. Limited per client and per client address, per "
    "stream, on every node together (429)."
)


def _cookie(response: dict) -> dict:
    """A response that may carry a new client-id cookie."""
    return {**response, "headers": _SET_COOKIE}


_WHEP_ENDPOINT = _session_endpoint("playing", "WHEP", auth=False)
_WHEP_ENDPOINT["post"]["parameters"] = [_START, _SESSION]
_WHEP_ENDPOINT["post"]["responses"]["201"]["headers"]["Link"] = {
    "description": 'STUN/TURN servers (`rel="ice-server"`) and the position API '
                   '(`rel="urn:whipcast:position"`)',
    "schema": {"type": "string"},
}  # fmt: skip

_HLS_SESSION = _param(
    "session", "Publish session id, 8 hex digits (from index.m3u8)", "^[0-9a-f]{8}$"
)
_SIGNED = [
    {
        "name": "exp",
        "in": "query",
        "required": False,
        "schema": {"type": "integer"},
        "description": "Signed URLs only: expiry, Unix seconds",
    },
    {
        "name": "sig",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "Signed URLs only: hex HMAC-SHA256 of `{stream}:{exp}`",
    },
]
_M3U8 = {"application/vnd.apple.mpegurl": {"schema": {"type": "string"}}}
_MP4 = {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}
HLS_PATHS: dict = {
    "/hls/{stream}/index.m3u8": {
        "parameters": [STREAM, *_SIGNED],
        "get": {
            "tags": ["HLS"], "summary": "LL-HLS multivariant playlist of the stream",
            "description": "Names the live publish session's media playlist (else the latest "
                           "ended one still in Kafka). H.264 video with Opus audio in CMAF; a "
                           "VP8 stream gets 415. Served by nodes with the `hls` role; "
                           "the first request for a session waits until it is packaged "
                           "up to the live edge.",
            "responses": {"200": {"description": "Playlist", "content": _M3U8},
                          **_errors(400, 403, 404, 415, 503)},
        },
    },
    "/hls/{stream}/{session}/media.m3u8": {
        "parameters": [STREAM, _HLS_SESSION, *_SIGNED],
        "get": {
            "tags": ["HLS"], "summary": "LL-HLS media playlist (blocking reload, delta updates)",
            "description": "`_HLS_msn`/`_HLS_part` hold the request until that part exists "
                           "(at most 3 target durations, then 503) and answer the playlist "
                           "as of that part; `_HLS_skip=YES|v2` gives a delta update.",
            "parameters": [
                {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                for n in ("_HLS_msn", "_HLS_part", "_HLS_skip")
            ],
            "responses": {"200": {"description": "Playlist", "content": _M3U8},
                          "304": {"description": "Unchanged (If-None-Match)"},
                          **_errors(400, 403, 404, 415, 503)},
        },
    },
    "/hls/{stream}/{session}/{file}": {
        "parameters": [STREAM, _HLS_SESSION, *_SIGNED,
                       _param("file", "`init{n}.mp4`, `seg{msn}.mp4` or `part{n}.mp4`",
                              r"^(init|seg|part)[0-9]+\.mp4$")],
        "get": {
            "tags": ["HLS"], "summary": "Init segment, segment or part (CMAF fMP4)",
            "description": "Immutable: long-cacheable with a strong ETag. A request for the "
                           "part named in the playlist's preload hint waits until it exists.",
            "responses": {"200": {"description": "Media", "content": _MP4},
                          "304": {"description": "Unchanged (If-None-Match)"},
                          **_errors(403, 404, 415, 503)},
        },
    },
}  # fmt: skip

PATHS: dict = {
    "/whip/{stream}": _session_endpoint("publishing", "WHIP", auth=True),
    "/whip/{stream}/{resource}": _session_resource("WHIP", auth=True),
    "/whep/{stream}": {
        **_WHEP_ENDPOINT,
        "get": {"tags": ["WHEP"], "summary": "Probe: answers 200 for a WHEP endpoint",
                "responses": {"200": EMPTY, **_errors(400)}},  # fmt: skip
    },
    "/whep/{stream}/{resource}": {
        **_session_resource("WHEP", auth=False),
        "get": {
            "tags": ["WHEP"], "summary": "The viewer's state: video live or paused, estimate",
            "description": "Polled by the watch page to tell the viewer when its link is "
                           "too slow for the stream (video paused until a keyframe it can "
                           "take; audio keeps flowing).",
            "responses": {"200": _json(_ref("ViewerStatus"), "The viewer's state"),
                          **_errors(400, 404)},
        },
    },  # fmt: skip
    "/whep/{stream}/{resource}/position": _POSITION,
    "/api/streams": {
        "get": {"tags": ["Directory"], "summary": "Live streams, or replays (`state=ended`)",
                "parameters": [_STATE],
                "responses": {"200": _json(_STREAMS, "Every live stream, or every replay "
                                                     "still in Kafka, newest first"),
                              **_errors(400)}},
    },
    "/api/streams/{stream}": {
        "parameters": [STREAM],
        "get": {"tags": ["Directory"], "summary": "One live stream",
                "responses": {"200": _json(_ref("Stream"), "The stream"), **_errors(404)}},
        "patch": {
            "tags": ["Directory"], "summary": "Set the title or reported resolution (host)",
            "security": HOST,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Details")}}},
            "responses": {"200": _json(_ref("Details"), "The details now"),
                          **_errors(400, 401, 413, 415, 503)},
        },
    },
    "/api/recordings": {
        "get": {
            "tags": ["Recordings"], "summary": "Recorded files, newest first",
            "description": "Fragmented MP4 (H.264) or WebM (VP8) with Opus, one file set per "
                           "publish session; a part being written is listed and playable. "
                           "Only on nodes that see the recording directory (`--record-dir`).",
            "parameters": [{"name": "stream", "in": "query", "required": False,
                            "description": "Only this stream's recordings",
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}],
            "responses": {
                "200": _json({"type": "object", "properties": {
                    "recordings": {"type": "array", "items": _ref("Recording")}}},
                    "The recordings"),
                **_errors(400, 404),
            },
        },
    },
    "/api/recordings/{stream}/{file}": {
        "parameters": [STREAM, _param("file", "File name from the listing",
                                      "^[A-Za-z0-9_-]+\\.(mp4|webm)$")],
        "get": {
            "tags": ["Recordings"], "summary": "One recording file",
            "description": "Supports `Range` requests (206), so players can seek.",
            "responses": {
                "200": {"description": "The file",
                        "content": {"video/mp4": {"schema": {"type": "string",
                                                             "format": "binary"}},
                                    "video/webm": {"schema": {"type": "string",
                                                              "format": "binary"}}}},
                "206": {"description": "The requested byte range"},
                **_errors(404),
            },
        },
    },
    "/api/streams/{stream}/thumbnail": {
        "parameters": [STREAM],
        "get": {
            "tags": ["Directory"], "summary": "The stream's latest picture (JPEG)",
            "description": "Made every few seconds while the stream is live and kept after "
                           "it ends (for its replay). `ETag` and `Cache-Control` allow "
                           "conditional requests (`If-None-Match` answers 304).",
            "responses": {
                "200": {"description": "The picture, at most 320 pixels wide by default",
                        "content": {"image/jpeg": {"schema": {"type": "string",
                                                              "format": "binary"}}}},
                "304": {"description": "Unchanged since the `If-None-Match` ETag"},
                **_errors(400, 404),
            },
        },
    },
    "/api/streams/{stream}/clip": {
        "parameters": [STREAM],
        "get": {
            "tags": ["Directory"], "summary": "A span of the stream as a file (MP4 or WebM)",
            "description": "Cut from Kafka without transcoding: MP4 for H.264 + Opus, WebM "
                           "for VP8 + Opus, starting on the keyframe at or before `from`, "
                           "with a filename in `Content-Disposition` and the duration in "
                           "`X-Clip-Duration`. Works for ended broadcasts still in Kafka. "
                           "Length and concurrent cuts per node are capped (default 600 s, "
                           "2 at once).",
            "parameters": [
                {"name": "from", "in": "query", "required": True, "schema": {"type": "string"},
                 "description": "Epoch milliseconds, or seconds before the live edge (`-30`)"},
                {"name": "to", "in": "query", "required": True, "schema": {"type": "string"},
                 "description": "Epoch milliseconds, or seconds before the live edge (`0`)"},
                _SESSION,
            ],
            "responses": {
                "200": {"description": "The clip",
                        "content": {"video/mp4": {"schema": {"type": "string",
                                                             "format": "binary"}},
                                    "video/webm": {"schema": {"type": "string",
                                                              "format": "binary"}}}},
                **_errors(400, 404),
                "422": {"description": "Range outside the window (body has the window)",
                        "content": {PROBLEM: {"schema": _ref("OutOfWindow")}}},
                **_errors(429, 503),
            },
        },
    },
    "/api/streams/{stream}/questions": {
        "parameters": [STREAM],
        "get": {
            "tags": ["Q&A"], "summary": "Questions, pinned first, then by votes",
            "description": "Sets the client-id cookie if missing or not valid. Hidden "
                           "questions are left out unless `view=host`.",
            "parameters": [HOST_VIEW],
            "responses": {"200": _cookie(_json(_ref("QuestionList"), "The questions")),
                          **_errors(400, 401, 404, 503)},
        },
        "post": {
            "tags": ["Q&A"], "summary": "Ask a question (stream must be live)",
            "description": "201 only once Kafka acknowledged it (acks=all) and it counted "
                           "within the limits. " + _FIRST_WRITE,
            "security": _CLIENT,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("NewQuestion")}}},
            "responses": {"201": _cookie(_json(_ref("Question"), "Saved")),
                          "202": _cookie(_ACCEPTED),
                          **_errors(400, 404, 409, 413, 415, 429, 503)},
        },
    },
    "/api/streams/{stream}/questions/events": {
        "parameters": [STREAM],
        "get": {
            "tags": ["Q&A"], "summary": "Live updates (server-sent events)",
            "description": "`snapshot` first (`QuestionList`), then `question` (a `Question` "
                           "that is new or changed) and, for viewers, `removed` (`{id}`, "
                           "hidden by the host). Comment lines are heartbeats. A client "
                           "too far behind is disconnected and should reconnect.",
            "parameters": [HOST_VIEW],
            "responses": {"200": _cookie({"description": "Event stream", "content": {
                              "text/event-stream": {"schema": {"type": "string"}}}}),
                          **_errors(400, 401, 404, 503)},
        },
    },
    "/api/streams/{stream}/questions/{question}/vote": {
        "parameters": [STREAM, QUESTION],
        "post": {
            "tags": ["Q&A"], "summary": "Vote for a question (once per client; repeats are no-ops)",
            "description": _FIRST_WRITE,
            "security": _CLIENT,
            "responses": {"200": _cookie(_json(_ref("Question"), "The question now")),
                          "202": _cookie(_ACCEPTED),
                          **_errors(400, 404, 429, 503)},
        },
    },
    "/api/streams/{stream}/questions/{question}": {
        "parameters": [STREAM, QUESTION],
        "patch": {
            "tags": ["Q&A"], "summary": "Pin, mark answered or hide (host)",
            "security": HOST,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Moderation")}}},
            "responses": {"200": _json(_ref("Question"), "The question now"), "202": _ACCEPTED,
                          **_errors(400, 401, 404, 413, 415, 503)},
        },
    },
    "/healthz": {"get": {"tags": ["Health"], "summary": "Liveness",
                         "responses": {"200": _json({"type": "object"}, "Serving")}}},
    "/readyz": {"get": {"tags": ["Health"], "summary": "Readiness: started and Kafka reachable",
                        "responses": {"200": _json({"type": "object"}, "Ready"),
                                      "503": _json({"type": "object"}, "Not ready")}}},
    "/metrics": {"get": {"tags": ["Health"], "summary": "Prometheus metrics",
                         "responses": {"200": {"description": "Prometheus text format",
                                               "content": {"text/plain": {}}}}}},
    "/api/stats": {"get": {"tags": ["Health"], "summary": "Live per-stream figures",
                           "responses": {"200": _json({"type": "object"}, "Snapshot")}}},
    "/api/nodes": {"get": {"tags": ["Health"], "summary": "Media nodes that are up, with load",
                           "responses": {"200": _json({"type": "object"}, "Node registry")}}},
    "/openapi.json": {"get": {"tags": ["Health"], "summary": "This document",
                              "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
}  # fmt: skip

DOCUMENT: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "whipcast",
        "version": "0.1.0",
        "description": "Low-latency live video: WHIP in, Apache Kafka between, WHEP out; "
        "a stream directory and audience Q&A.",
    },
    "paths": PATHS | HLS_PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": {
            f"E{status}": _problem(status, reason) for status, reason in _REASONS.items()
        },
        "securitySchemes": {
            "publishToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "The publish token (only when one is configured)",
            },
            "clientCookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": "whipcast_client",
                "description": "Signed random client id (`{id}.{HMAC tag}`), set by any "
                "Q&A request that arrives without a valid one",
            },
        },  # fmt: skip
    },
}


def add_routes(app: web.Application) -> None:
    async def document(request: web.Request) -> web.Response:
        return web.json_response(DOCUMENT)

    app.router.add_get("/openapi.json", document)
