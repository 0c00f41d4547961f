"""The limit rules and the circuit on their own, with a clock the test moves."""

from __future__ import annotations

from worker.limits import CircuitRule, ContentWindow, Pace, SubscriberStreaks


def test_identical_content_goes_twice_per_window_then_waits_for_the_oldest() -> None:
    window = ContentWindow(allowed=2, window=60)
    window.record("k", 0)
    window.record("k", 10)
    assert window.wait("k", 20) == 40
    assert window.wait("other", 20) == 0
    assert window.wait("k", 60) == 0
    window.forget_latest("k")
    assert window.wait("k", 20) == 0


def test_a_subscriber_streak_stops_at_the_limit_until_the_gap_passes() -> None:
    streaks = SubscriberStreaks(limit=3, gap=120)
    for t in (0, 10, 20):
        assert streaks.wait("+79161234567", t) == 0
        streaks.record("+79161234567", t)
    assert streaks.wait("+79161234567", 30) == 110
    assert streaks.wait("+79161234568", 30) == 0
    assert streaks.wait("+79161234567", 140) == 0
    streaks.record("+79161234567", 140)
    assert streaks.wait("+79161234567", 150) == 0


def test_the_pace_lets_a_seconds_worth_through_then_spaces_the_rest() -> None:
    pace = Pace(rate=2)
    assert pace.take(1, 100.0) == 0
    assert pace.take(1, 100.0) == 0
    assert pace.take(1, 100.0) == 0.5
    assert pace.take(1, 100.5) == 0
    # A cost over one second's worth takes the whole second, not forever.
    assert Pace(rate=2).take(50, 100.0) == 0


def test_the_circuit_pauses_then_lets_one_probe_through_and_doubles() -> None:
    circuit = CircuitRule(base=1, cap=4)
    assert circuit.gate(10) == (0.0, False)
    assert circuit.open("blocked", None, 10) == 1
    assert circuit.view(10) == "open"
    assert circuit.gate(10.5) == (0.5, False)
    assert circuit.gate(11) == (0.0, True)
    assert circuit.view(11) == "half_open"
    assert circuit.gate(11.2)[0] > 0, "only one probe while half-open"
    assert circuit.gate(12.1) == (0.0, True), "a probe with no verdict lets the next go"
    circuit.close()
    assert circuit.gate(12.2) == (0.0, False)
    assert circuit.open("again", None, 20) == 1
    assert circuit.open("and again", None, 20) == 2
    assert circuit.open("still", None, 20) == 4
    assert circuit.open("capped", None, 20) == 4
    assert circuit.open("funds", 300, 20) == 300
