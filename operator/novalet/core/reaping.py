"""Orphan reaping: which of a node's domains an agent may destroy, as a pure function.

A domain that carries novalet metadata for this node but whose VirtualInstance is gone is an
orphan (DESIGN.md section 2) and is destroyed with its disks. Destroying is the one thing an
agent does that cannot be undone, so the rule is built to fail safe:

- only a positive answer counts: a domain is a candidate only when the object it names is
  confirmed gone (a GET of namespace/name answered 404, or an object with another uid). A
  domain whose object is in the listing or answers with its uid is present; any other answer
  (an error, a timeout, a denied GET) is unknown, which never reaps and restarts the clock;
- a grace period: a candidate is reaped only once it has been confirmed gone at every look for
  `grace_s` (the clock lives in the agent's memory: a restart starts it again);
- no mass reap: when more than `max_per_sweep` domains, or all of the node's domains (when it
  has more than one), are possible orphans at once, nothing is reaped and every clock restarts.
  That is what an agent pointed at the wrong cluster or namespace sees; it says so loudly (an
  Event and an ERROR line, again every `remind_s` while it lasts) instead of destroying a
  node's guests and disks;
- an off switch (`enabled=False`): nothing is ever reaped; a mass is still reported.

`decide` does no I/O and takes `now` (a monotonic clock) from the caller.
"""
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class Lookup(str, Enum):
    PRESENT = "present"  # in the listing, or a GET answered with this domain's uid
    GONE = "gone"        # a GET answered 404, or an object of the same name with another uid
    UNKNOWN = "unknown"  # any other answer: never reaps


@dataclass(frozen=True)
class ReapPolicy:
    enabled: bool = True
    grace_s: float = 300.0     # confirmed gone at every look for this long before it is reaped
    max_per_sweep: int = 3     # more possible orphans than this at once: a mass, nothing reaped
    remind_s: float = 600.0    # a refused mass is reported again this often while it lasts

    def __post_init__(self) -> None:
        if self.grace_s < 0 or self.remind_s <= 0:
            raise ValueError(f"grace must be >= 0 and remind > 0 (got {self.grace_s}, {self.remind_s})")
        if self.max_per_sweep < 1:
            raise ValueError(f"max orphans per sweep must be >= 1 (got {self.max_per_sweep})")


@dataclass(frozen=True)
class ReaperMemory:
    """What the agent remembers between looks (in memory only)."""

    first_seen: Mapping[str, float] = field(default_factory=dict)  # uid -> first confirmed gone
    reported: frozenset[str] = frozenset()  # the set last reported (a mass, or orphans kept)
    reported_at: float | None = None


@dataclass(frozen=True)
class Verdict:
    reap: tuple[str, ...]      # destroy these now, domain and disks
    waiting: tuple[str, ...]   # confirmed gone, in their grace period (or kept: reaping is off)
    refused: tuple[str, ...]   # a mass: every possible orphan is kept
    announce: bool             # report now (mass: Warning Event + ERROR line; off: a WARNING line)
    reason: str                # what to tell the operator ("" when there is nothing to say)
    next_due: float | None     # when the earliest waiting candidate's grace ends: look again then
    memory: ReaperMemory


def is_mass(suspects: int, node_domains: int, policy: ReapPolicy) -> bool:
    return suspects > policy.max_per_sweep or (node_domains > 1 and suspects == node_domains)


def _announce(suspects: frozenset[str], memory: ReaperMemory, now: float, policy: ReapPolicy) -> bool:
    if not suspects:
        return False
    return (suspects != memory.reported or memory.reported_at is None
            or now - memory.reported_at >= policy.remind_s)


def decide(node_domains: Sequence[str], lookups: Mapping[str, Lookup], memory: ReaperMemory,
           now: float, policy: ReapPolicy) -> Verdict:
    """`node_domains`: uids of every domain carrying novalet metadata for this node;
    `lookups`: what the apiserver said about each (a missing entry is UNKNOWN)."""
    domains = tuple(dict.fromkeys(node_domains))
    look = {uid: lookups.get(uid, Lookup.UNKNOWN) for uid in domains}
    gone = tuple(uid for uid in domains if look[uid] is Lookup.GONE)
    suspects = tuple(uid for uid in domains if look[uid] is not Lookup.PRESENT)

    if is_mass(len(suspects), len(domains), policy):
        which = "all" if len(suspects) == len(domains) else f"{len(suspects)}"
        reason = (f"refusing to reap {len(suspects)} domains at once ({which} of the node's "
                  f"{len(domains)} domains have no VirtualInstance this agent can confirm; "
                  f"the limit is {policy.max_per_sweep} and never all of a node's domains)")
        announce = _announce(frozenset(suspects), memory, now, policy)
        return Verdict((), (), suspects, announce, reason, None, ReaperMemory(
            {}, frozenset(suspects), now if announce else memory.reported_at))

    first_seen = {uid: memory.first_seen.get(uid, now) for uid in gone}
    if not policy.enabled:
        announce = _announce(frozenset(gone), memory, now, policy)
        reason = f"keeping {len(gone)} orphan domains: orphan reaping is off" if gone else ""
        return Verdict((), gone, (), announce, reason, None, ReaperMemory(
            first_seen, frozenset(gone), now if announce else memory.reported_at))

    reap = tuple(uid for uid in gone if now - first_seen[uid] >= policy.grace_s)
    waiting = tuple(uid for uid in gone if uid not in reap)
    next_due = min((first_seen[uid] + policy.grace_s for uid in waiting), default=None)
    remaining = {uid: t for uid, t in first_seen.items() if uid not in reap}
    return Verdict(reap, waiting, (), False, "", next_due, ReaperMemory(remaining, frozenset(), None))
