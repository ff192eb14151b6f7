"""One condition setter (core/conditions.py): the transition time moves only with the status,
a condition replaces its own type in place, an unchanged status compares equal."""
from datetime import UTC, datetime, timedelta

from novalet.api.models import VirtualInstanceStatus
from novalet.core.conditions import find, same, set_condition

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_a_new_condition_is_appended_with_now_as_its_transition():
    status = set_condition(VirtualInstanceStatus(), "Ready", True, "Running", "", T0)
    ready = find(status, "Ready")
    assert (ready.status, ready.reason, ready.lastTransitionTime) == ("True", "Running", T0)


def test_the_transition_time_moves_only_when_the_status_changes():
    status = set_condition(VirtualInstanceStatus(), "Ready", True, "Running", "", T0)
    reworded = set_condition(status, "Ready", True, "Running", "still running", T1)
    assert find(reworded, "Ready").lastTransitionTime == T0 and find(reworded, "Ready").message == "still running"
    flipped = set_condition(reworded, "Ready", False, "Rebooting", "", T1)
    assert find(flipped, "Ready").lastTransitionTime == T1


def test_a_condition_replaces_its_own_type_in_place():
    status = VirtualInstanceStatus()
    for type_ in ("Ready", "Reconciling", "Stalled", "HostAgentReady"):
        status = set_condition(status, type_, False, "x", "", T0)
    status = set_condition(status, "Reconciling", True, "pausing", "", T1)
    assert [c.type for c in status.conditions] == ["Ready", "Reconciling", "Stalled", "HostAgentReady"]
    again = set_condition(status, "Reconciling", True, "pausing", "", T1 + timedelta(seconds=1))
    assert again == status  # nothing changed: nothing to write


def test_same_ignores_only_the_transition_time():
    a = find(set_condition(VirtualInstanceStatus(), "Ready", True, "Running", "", T0), "Ready")
    b = a.model_copy(update={"lastTransitionTime": T1})
    assert same(a, b) and not same(a, a.model_copy(update={"reason": "Paused"})) and not same(a, None)
