"""The one way novalet sets a status condition (apimachinery's `meta.SetStatusCondition`).

`lastTransitionTime` moves only when the condition's status changes; reason and message follow
the latest word. Pure: the caller passes `now`.
"""
from datetime import datetime
from typing import Literal

from ..api.models import Condition, VirtualInstanceStatus

Status = Literal["True", "False", "Unknown"]


def condition(status: VirtualInstanceStatus, type_: str, value: bool | Status, reason: str, message: str,
              now: datetime) -> Condition:
    """The condition `type_` as it should read now, its transition time kept when unchanged."""
    text = value if isinstance(value, str) else ("True" if value else "False")
    old = next((c for c in status.conditions if c.type == type_), None)
    when = old.lastTransitionTime if old and old.status == text and old.lastTransitionTime else now
    return Condition(type=type_, status=text, reason=reason, message=message, lastTransitionTime=when)


def set_conditions(status: VirtualInstanceStatus, *conditions: Condition) -> VirtualInstanceStatus:
    """The status with these conditions set (made by `condition`): each replaces its type in
    place, a new type is appended; the order stays stable, so an unchanged status compares equal."""
    new = {c.type: c for c in conditions}
    updated = [new.pop(c.type, c) for c in status.conditions]
    return status.model_copy(update={"conditions": [*updated, *new.values()]})


def set_condition(status: VirtualInstanceStatus, type_: str, value: bool | Status, reason: str, message: str,
                  now: datetime) -> VirtualInstanceStatus:
    return set_conditions(status, condition(status, type_, value, reason, message, now))


def same(a: Condition | None, b: Condition | None) -> bool:
    """Do two conditions say the same thing (transition time aside)?"""
    return (a is None) == (b is None) and (a is None or (a.status, a.reason, a.message) == (b.status, b.reason, b.message))


def find(status: VirtualInstanceStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)
