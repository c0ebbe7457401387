"""Which simulcast layer each viewer gets: the best one its bandwidth estimate carries.

A stream published with simulcast has up to three video layers (best first, each on
its own partition: ``frames.video_partition``). The egress reads every layer once per
node (``egress.StreamFanout``) and keeps a GOP per layer; each viewer is on one layer,
and a :class:`LayerSelector` per viewer says which one it should be on, from its
``bandwidth.BandwidthEstimate`` and the layers' measured bitrates (:class:`LayerRate`).
It is asked a few times a second by the stream's fan-out (never per frame or packet);
the viewer makes the switch at a keyframe of the target layer (``egress.ViewerSession``).

The rules follow production SFUs (mediasoup, OvenMediaEngine; see
``/work/shared/notes/adaptation.md`` in the project notes):

- **Down fast**: once the estimate has stayed below the current layer's bitrate for
  ``DOWN_CONFIRM_S`` (one loss report from a CPU stall on a busy receiver is no
  trend), or at once when it is far below (``DOWN_NOW_AT``), the viewer goes to the best
  layer that fits with ``FITS`` to spare, or the lowest. A layer that stopped (the
  publisher's own uplink turned it off) is left at once.
- **Up slowly, one step at a time, as a probe**: only after the estimate has carried
  the current layer with ``ROOM`` to spare for ``hold`` seconds without a break
  (``Settings.layer_up_hold_s``, 10 s after a switch down, like mediasoup's and OME's
  10 s). The estimate cannot tell by itself whether a better layer would fit (it never
  climbs past twice what was sent), so the switch up *is* the probe: the viewer's
  estimate is raised to the better layer's needs through ``BandwidthEstimate.probe``,
  whose failure rules (NACKs for a quarter of the probe's packets, a receiver report
  over 10 % loss) put the estimate back and so bring the viewer down again within a
  round trip or two. A try that fails doubles the hold (up to
  ``Settings.layer_up_max_hold_s``); one that holds ``PROBE_OK_S`` resets it, and those
  seconds count as the hold for the next step up. A failed try goes back to the layer
  it came from, and for ``GRACE_S`` the loss reports the try itself caused do not push
  the viewer further down (only a far lower estimate does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .metrics import StreamSeries

DOWN_AT = 1.0  # an estimate below this x the layer's bitrate leaves it ...
DOWN_CONFIRM_S = 1.0  # ... once it has stayed there this long (one report is no trend)
DOWN_NOW_AT = 0.75  # ... or at once, below this x (no doubt about it)
FITS = 1.15  # a layer fits an estimate this x its bitrate (headers, keyframe bursts)
ROOM = 1.3  # the current layer is carried with room to spare at this x its bitrate
PROBE_OK_S = 5.0  # a switch up that held this long succeeded (bandwidth.PROBE_FAILED_S)
GRACE_S = 3.0  # after a failed try, loss reports still describe the try, not the layer
GRACE_DOWN_AT = 0.6  # ... so meanwhile only an estimate below this x the layer's leaves it
RATE_WINDOW_S = 2.0  # a layer's bitrate is measured over this (GOPs vary)
ALIVE_S = 1.5  # a layer without a frame for this long (its publisher stopped it) is left
FAST_SWITCH_S = 0.25  # a cached GOP that a viewer's estimate sends in this is sent at once


class LayerRate:
    """One layer's bitrate and liveness, counted once per frame for all its viewers."""

    __slots__ = ("bitrate", "last_us", "_bytes", "_from_us")

    def __init__(self) -> None:
        self.bitrate = 0.0
        """Bits/s over the last ``RATE_WINDOW_S`` or more (0 until first measured)."""
        self.last_us = 0
        """Ingest arrival time of the layer's newest frame (µs since the epoch)."""
        self._bytes = 0
        self._from_us: int | None = None

    def count(self, size: int, arrival_us: int) -> None:
        self.last_us = arrival_us
        self._bytes += size
        start = self._from_us
        if start is None:
            self._from_us, self._bytes = arrival_us, 0
        elif arrival_us - start >= RATE_WINDOW_S * 1e6:
            self.bitrate = self._bytes * 8e6 / (arrival_us - start)
            self._from_us, self._bytes = arrival_us, 0

    def alive(self, newest_us: int) -> bool:
        """Whether the layer still flows, judged against the stream's newest frame."""
        return self.bitrate > 0 and newest_us - self.last_us < ALIVE_S * 1e6


class LayerSelector:
    """One viewer's layer: where it is, and where its estimate says it should be."""

    def __init__(self, hold_s: float, max_hold_s: float, now: float) -> None:
        self.layer = 0
        """The layer the viewer gets (0: the best); starts at the top."""
        self.switches_up = 0
        self.switches_down = 0
        self.failed_ups = 0
        """Switches up undone within ``PROBE_OK_S``: the link could not carry them."""
        self._base_hold = hold_s
        self._max_hold = max_hold_s
        self._hold = hold_s  # grows with failed tries
        self._wait = hold_s  # the hold in force now (shorter right after a try held)
        self._room_since: float | None = None
        self._up_at: float | None = None  # a switch up not yet confirmed
        self._up_from = 0  # the layer it came from
        self._grace_until = float("-inf")
        self._short_since: float | None = None  # the estimate fell below the layer's

    def choose(
        self, estimate: float, bitrates: Sequence[float], alive: Sequence[bool], now: float
    ) -> int:
        """The layer the viewer should be on now (its current one if nothing changes)."""
        layer = self.layer
        usable = [k for k, up in enumerate(alive) if up and bitrates[k] > 0]
        if not usable:
            return layer  # nothing measured yet: stay where the viewer started
        if self._up_at is not None and now - self._up_at >= PROBE_OK_S:
            self._up_at = None  # the last try held
            self._hold = self._base_hold
            self._wait = PROBE_OK_S
        fits = [k for k in usable if estimate >= bitrates[k] * FITS]
        if layer not in usable:
            return fits[0] if fits else usable[-1]
        if estimate < bitrates[layer] * DOWN_AT:
            if self._up_at is not None and self._up_from in usable:
                return self._up_from  # the try failed: back to where it came from
            if now < self._grace_until and estimate >= bitrates[layer] * GRACE_DOWN_AT:
                return layer
            if self._short_since is None:
                self._short_since = now
            clear = estimate < bitrates[layer] * DOWN_NOW_AT
            if not clear and now - self._short_since < DOWN_CONFIRM_S:
                return layer
            lower = [k for k in fits if k > layer]
            return lower[0] if lower else max(usable[-1], layer)
        self._short_since = None
        better = [k for k in usable if k < layer]
        if not better or estimate < bitrates[layer] * ROOM:
            self._room_since = None
            return layer
        if self._room_since is None:
            self._room_since = now
        if now - self._room_since < self._wait:
            return layer
        return better[-1]

    def switched(self, layer: int, now: float) -> None:
        """The viewer now gets ``layer`` (from its first keyframe on)."""
        if layer == self.layer:
            return
        if layer > self.layer:
            self.switches_down += 1
            if self._up_at is not None:  # the link could not carry the last try
                self.failed_ups += 1
                self._hold = min(self._max_hold, 2 * self._hold)
                self._grace_until = now + GRACE_S
            self._up_at = None
            self._wait = self._hold
        else:
            self.switches_up += 1
            self._up_at, self._up_from = now, self.layer
            self._wait = self._hold
        self.layer = layer
        self._room_since = None
        self._short_since = None

    def not_now(self) -> None:
        """A switch up could not be tried (the estimate refused a probe so soon): the
        hold starts over."""
        self._room_since = None


def add_layer_metrics(
    series: StreamSeries,
    stream: str,
    viewers_per_layer: Sequence[int],
    switches_up: int,
    switches_down: int,
    failed_ups: int,
) -> None:
    """One stream's layer moves for a metrics scrape (``/metrics``): its viewers on each
    layer and their switches, summed over its viewers (no per-viewer labels)."""
    for layer, viewers in enumerate(viewers_per_layer):
        series.add(
            "gauge",
            "whipcast_egress_layer_viewers",
            "Viewers of a simulcast stream on each layer (0: the best)",
            stream,
            viewers,
            layer=str(layer),
        )
    for direction, value in (("up", switches_up), ("down", switches_down)):
        series.add(
            "counter",
            "whipcast_egress_layer_switches",
            "Simulcast layer switches of viewers, up (a better layer) or down",
            stream,
            value,
            direction=direction,
        )
    series.add(
        "counter",
        "whipcast_egress_layer_failed_ups",
        "Switches up undone within seconds: the viewer's link could not carry them",
        stream,
        failed_ups,
    )
