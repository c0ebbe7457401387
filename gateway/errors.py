"""Client errors raised by the media plane; ``status`` is the HTTP answer for them.

The signaling layer turns these into problem documents; the message is written for
the client and must never contain secrets or SDP.
"""


class SessionError(Exception):
    status = 400
    headers: dict[str, str] = {}


class UnprocessableOffer(SessionError):
    """Well-formed, but asks for something whipcast does not do (RFC 9725: 422)."""

    status = 422


class NotLive(SessionError):
    status = 404


class StreamBusy(SessionError):
    status = 409


class Unavailable(SessionError):
    """Kafka cannot be reached: the client should try again shortly (or elsewhere)."""

    status = 503
    headers = {"Retry-After": "5"}
