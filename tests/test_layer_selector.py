"""The layer choice rules alone (gateway/layers.py), on a made-up clock: down at once,
up only after a hold and one step at a time, failed tries back off."""

from __future__ import annotations

from whipcast.gateway.layers import (
    ALIVE_S,
    DOWN_CONFIRM_S,
    PROBE_OK_S,
    LayerRate,
    LayerSelector,
)

RATES = [1_500_000.0, 400_000.0, 120_000.0]
ALIVE = [True, True, True]


def settle(selector: LayerSelector, estimate: float, start: float, seconds: float) -> float:
    """Ask every 0.25 s for ``seconds`` or until a switch (made at once, and a switch up
    raises the estimate as its probe does); the time reached."""
    now, layer = start, selector.layer
    while now < start + seconds and selector.layer == layer:
        target = selector.choose(estimate, RATES, ALIVE, now)
        if target != selector.layer:
            selector.switched(target, now)
        now += 0.25
    return now


def test_down_fast_to_the_best_layer_that_fits():
    selector = LayerSelector(10.0, 15.0, 0.0)
    assert selector.choose(50e6, RATES, ALIVE, 0.0) == 0
    # Somewhat short: once it has stayed short for DOWN_CONFIRM_S.
    assert selector.choose(1.2e6, RATES, ALIVE, 0.1) == 0
    assert selector.choose(1.3e6, RATES, ALIVE, 0.1 + DOWN_CONFIRM_S / 2) == 0
    assert selector.choose(1.2e6, RATES, ALIVE, 0.2 + DOWN_CONFIRM_S) == 1
    # A dip that recovers is forgotten.
    assert selector.choose(2e6, RATES, ALIVE, 2.0) == 0
    assert selector.choose(1.2e6, RATES, ALIVE, 2.1) == 0
    # Far short: at once.
    assert selector.choose(300e3, RATES, ALIVE, 3.0) == 2
    assert selector.choose(50e3, RATES, ALIVE, 3.0) == 2  # nothing fits: the lowest
    # Nothing measured yet (a stream just started): the viewer stays on the top layer.
    assert selector.choose(50e3, [0.0, 0.0, 0.0], ALIVE, 0.1) == 0


def test_up_one_step_after_the_hold_then_faster_while_tries_hold():
    selector = LayerSelector(10.0, 15.0, 0.0)
    selector.switched(2, 0.0)
    # Room to spare for layer 2 but the hold is not over: stays.
    now = settle(selector, 1e6, 0.0, 9.5)
    assert selector.layer == 2
    now = settle(selector, 1e6, now, 1.0)
    assert selector.layer == 1 and selector.switches_up == 1 and 10 <= now <= 10.5
    # Once the try has held PROBE_OK_S, the next step may come: no 10 s hold again.
    up_at = now
    now = settle(selector, 3e6, now, 2 * PROBE_OK_S + 1)
    assert selector.layer == 0 and selector.failed_ups == 0
    assert PROBE_OK_S <= now - up_at <= PROBE_OK_S + 0.75, now - up_at
    # A drop in the estimate interrupts the room: the hold starts over.
    other = LayerSelector(10.0, 15.0, 0.0)
    other.switched(1, 0.0)
    now = settle(other, 1e6, 0.0, 8.0)
    now = settle(other, 450e3, now, 1.0)  # carries layer 1, without room
    settle(other, 1e6, now, 8.0)
    assert other.layer == 1


def test_a_failed_try_goes_back_and_doubles_the_hold():
    selector = LayerSelector(10.0, 15.0, 0.0)
    selector.switched(1, 0.0)
    now = settle(selector, 1e6, 0.0, 10.5)
    assert selector.layer == 0 and selector.switches_up == 1
    # The probe failed: the estimate fell far, yet the viewer goes back to layer 1
    # (where it came from), not further down on the loss the try itself caused.
    assert selector.choose(300e3, RATES, ALIVE, now) == 1
    selector.switched(1, now)
    assert selector.failed_ups == 1
    assert selector.choose(300e3, RATES, ALIVE, now + 1) == 1  # grace
    assert selector.choose(200e3, RATES, ALIVE, now + 1) == 2  # far lower: it goes
    # The next try waits the doubled hold, capped at 15 s.
    start = now
    now = settle(selector, 1e6, now + 1, 30)
    assert selector.layer == 0 and 14.5 <= now - start <= 16.5, now - start


def test_a_layer_that_stopped_is_left():
    selector = LayerSelector(10.0, 15.0, 0.0)
    assert selector.choose(50e6, RATES, [False, True, True], 0.0) == 1
    rate = LayerRate()
    for i in range(100):
        rate.count(1000, i * 33_000)
    assert rate.bitrate > 0 and rate.alive(99 * 33_000)
    assert not rate.alive(99 * 33_000 + int(ALIVE_S * 1e6) + 1)
