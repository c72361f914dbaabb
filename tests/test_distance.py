"""Invocation distance: the tracker's estimates, what each step changes, and the hint formats."""

import pytest

from scalesim.distance.hints import estimate_distances
from scalesim.distance.tracker import DistanceTracker
from scalesim.errors import InvalidRequestError
from tests.memory_util import Clock


def _calls(tracker: DistanceTracker, clock: Clock, agent: str, times: list[float]) -> None:
    for t in times:
        clock.now_s = t
        tracker.on_request(agent)
        tracker.on_finish(agent)


def test_distances_decay_by_one_per_step_and_a_request_sets_zero():
    tracker = DistanceTracker()
    tracker.track("alice")
    tracker.advance(0)
    tracker.hint({"alice": 5})
    tracker.advance(2)
    assert tracker.distance("alice") == 3
    tracker.on_request("alice")
    assert tracker.distance("alice") == 0
    tracker.on_finish("alice")
    assert tracker.distance("alice") == 3, "the hint still lies in the future"


def test_a_hint_lasts_its_whole_step_and_is_spent_after_it():
    tracker = DistanceTracker()
    tracker.track("alice")
    tracker.advance(0)
    tracker.hint({"alice": 0})
    assert tracker.advance(0) == [] and tracker.expected_step("alice") == 0
    assert tracker.advance(1) == ["alice"] and tracker.expected_step("alice") == float("inf")


def test_without_steps_a_hint_counts_from_now_and_is_spent_by_the_wall_clock():
    clock = Clock()
    tracker = DistanceTracker(clock=clock)
    tracker.track("alice")
    clock.now_s = 1000.0
    tracker.hint({"alice": 5})  # a client that never sends steps: 5 seconds-steps from now
    assert tracker.distance("alice") == pytest.approx(5.0)
    clock.now_s = 1004.0
    assert tracker.refresh() == [] and tracker.distance("alice") == pytest.approx(1.0)
    clock.now_s = 1006.0
    assert tracker.refresh() == ["alice"] and tracker.expected_step("alice") == float("inf")


def test_the_first_step_re_expresses_a_pending_seconds_hint_as_steps():
    clock = Clock()
    tracker = DistanceTracker(clock=clock)
    tracker.track("alice")
    clock.now_s = 10.0
    tracker.hint({"alice": 3})
    clock.now_s = 11.0
    assert tracker.advance(4) == ["alice"]
    assert tracker.expected_step("alice") == pytest.approx(4 + 2.0 / tracker.seconds_per_step)


def test_without_hints_the_learned_fallback_uses_the_agents_own_inter_arrival_time():
    clock = Clock()
    tracker = DistanceTracker(clock=clock)
    _calls(tracker, clock, "bob", [0.0, 10.0, 20.0])
    clock.now_s = 25.0
    assert tracker.distance("bob") == pytest.approx(5.0 / tracker.seconds_per_step)
    assert tracker.distance("stranger") == float("inf")


def test_an_overdue_agent_is_expected_a_period_later_then_twice_as_long_each_miss():
    clock = Clock()
    tracker = DistanceTracker(clock=clock)
    _calls(tracker, clock, "bob", [0.0, 10.0, 20.0])  # every 10 s; then it goes quiet
    clock.now_s = 36.0  # due at 30 s, missed: next due at 40 s
    assert tracker.distance("bob") == pytest.approx(4.0)
    assert tracker.refresh() == ["bob"] and tracker.expected_step("bob") == pytest.approx(40.0)
    clock.now_s = 45.0  # missed again: the wait doubles (due at 60 s)
    assert tracker.refresh() == ["bob"] and tracker.expected_step("bob") == pytest.approx(60.0)
    clock.now_s = 59.0
    assert tracker.refresh() == [], "nothing is due: nothing changes"


def test_advancing_a_step_reports_only_the_agents_whose_estimate_moved():
    clock = Clock()
    tracker = DistanceTracker(clock=clock)
    tracker.advance(0)
    for i in range(1000):
        tracker.track(f"a{i}")
    tracker.hint({f"a{i}": 5 + i % 10 for i in range(1000)})
    clock.now_s = 1.0
    _calls(tracker, clock, "periodic", [1.0, 3.0])  # due at step 5
    clock.now_s = 6.0
    changed = tracker.advance(6)
    assert sorted(changed) == sorted({f"a{i}" for i in range(1000) if 5 + i % 10 < 6} | {"periodic"})


def test_the_first_simulation_step_rebases_estimates_made_on_the_seconds_clock():
    clock = Clock()
    tracker = DistanceTracker(clock=clock)
    _calls(tracker, clock, "carol", [100.0, 110.0])  # due 10 s after now, on the seconds clock
    clock.now_s = 112.0
    assert tracker.advance(1) == ["carol"]
    assert tracker.expected_step("carol") == pytest.approx(1 + 8.0 / tracker.seconds_per_step)


def test_hints_about_agents_nobody_tracks_are_bounded_and_adopted_later():
    tracker = DistanceTracker(max_untracked=100)
    tracker.advance(0)
    changed, strangers = tracker.hint({f"s{i}": 3 for i in range(10_000)})
    assert (changed, strangers) == ([], 10_000) and len(tracker.untracked) <= 100
    tracker.hint({"late": 4})
    tracker.track("late")  # it registered: its pending hint comes along
    assert tracker.expected_step("late") == 4 and tracker.is_tracked("late")


def test_estimators_combine_by_minimum():
    d = estimate_distances(10, distances={"a": 7}, schedule={"a": 12, "b": 30}, turn_order=["c", "b"],
                           probabilities={"d": 0.25}, active=["e"], frontier=["f"], graph={"f": ["g"], "g": ["h"]},
                           positions={"i": [0, 0], "j": [0, 4]}, speed=1.0, cooldowns={"j": 9})
    assert d == {"a": 2, "b": 1, "c": 0, "d": 4.0, "e": 0, "f": 0, "g": 1, "h": 2, "i": 2, "j": 9}


def test_the_papers_update_shape_is_accepted(tiny_llm):
    accepted = tiny_llm.hint(agent_data={"x": 3}, timestep_data={"1": ["y", "z"]}, timestep_cnt=4)
    assert accepted["step"] >= 4 and accepted["agents"] == 3
    assert tiny_llm.engine.tracker.distance("y") == 1


def test_hints_naming_unknown_agents_are_accepted_and_counted(tiny_llm):
    before = tiny_llm.memory_stats().get("hinted_unknown_agents", 0)
    accepted = tiny_llm.hint(distances={"nobody-1": 1, "nobody-2": 2})
    assert accepted["unknown"] == 2
    assert tiny_llm.memory_stats()["hinted_unknown_agents"] == before + 2


@pytest.mark.parametrize("hints", [{"distances": {"a": -1}}, {"distances": ["a"]}, {"probabilities": {"a": 2}},
                                   {"turn_order": "abc"}, {"positions": {"a": [1]}}, {"step": -3}])
def test_bad_hints_get_a_clear_error(tiny_llm, hints):
    with pytest.raises(InvalidRequestError):
        tiny_llm.hint(**hints)
