"""The orphan reaper's rule (core/reaping.py): table-driven rows, then properties over random
sequences of looks."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novalet.core.reaping import Lookup, ReaperMemory, ReapPolicy, Verdict, decide

P, G, U = Lookup.PRESENT, Lookup.GONE, Lookup.UNKNOWN
POLICY = ReapPolicy(grace_s=300, max_per_sweep=3)


def look(states: str) -> tuple[list[str], dict[str, Lookup]]:
    """'PGU' -> domains d0 d1 d2 with those lookups."""
    codes = {"P": P, "G": G, "U": U}
    uids = [f"d{i}" for i in range(len(states))]
    return uids, {uid: codes[c] for uid, c in zip(uids, states, strict=True)}


def run(states: str, seen: dict[str, float] | None = None, now: float = 1000.0,
        policy: ReapPolicy = POLICY) -> Verdict:
    uids, lookups = look(states)
    return decide(uids, lookups, ReaperMemory(seen or {}), now, policy)


ALL_SEEN_LONG_AGO = {f"d{i}": 0.0 for i in range(10)}

ROWS = [
    # (lookups, first seen, policy, reaped, refused)
    ("", {}, POLICY, (), ()),
    ("PPP", ALL_SEEN_LONG_AGO, POLICY, (), ()),
    ("G", {}, POLICY, (), ()),                                   # first sight: grace starts
    ("G", {"d0": 800.0}, POLICY, (), ()),                        # 200 s < 300 s
    ("G", {"d0": 700.0}, POLICY, ("d0",), ()),                   # 300 s: a lone domain may go
    ("U", ALL_SEEN_LONG_AGO, POLICY, (), ()),                    # unknown never reaps
    ("PG", ALL_SEEN_LONG_AGO, POLICY, ("d1",), ()),
    ("PU", ALL_SEEN_LONG_AGO, POLICY, (), ()),
    ("GG", ALL_SEEN_LONG_AGO, POLICY, (), ("d0", "d1")),         # all of the node's domains
    ("GU", ALL_SEEN_LONG_AGO, POLICY, (), ("d0", "d1")),         # all possible orphans: mass
    ("PGGG", ALL_SEEN_LONG_AGO, POLICY, ("d1", "d2", "d3"), ()),  # 3 of 4: at the limit
    ("PGGGG", ALL_SEEN_LONG_AGO, POLICY, (), ("d1", "d2", "d3", "d4")),  # 4 > 3
    ("PGGGU", ALL_SEEN_LONG_AGO, POLICY, (), ("d1", "d2", "d3", "d4")),  # unknowns count as suspects
    ("PPGU", ALL_SEEN_LONG_AGO, POLICY, ("d2",), ()),
    ("G", ALL_SEEN_LONG_AGO, ReapPolicy(enabled=False), (), ()),  # off switch
    ("GG", ALL_SEEN_LONG_AGO, ReapPolicy(enabled=False), (), ("d0", "d1")),  # a mass is still one
    ("G", {}, ReapPolicy(grace_s=0), ("d0",), ()),               # no grace: at first sight
    ("PPGGGGG", ALL_SEEN_LONG_AGO, ReapPolicy(max_per_sweep=10), ("d2", "d3", "d4", "d5", "d6"), ()),
]


@pytest.mark.parametrize("states,seen,policy,reaped,refused", ROWS)
def test_rows(states, seen, policy, reaped, refused):
    verdict = run(states, seen, policy=policy)
    assert verdict.reap == reaped
    assert verdict.refused == refused


def test_a_mass_is_announced_once_then_reminded():
    uids, lookups = look("GGGG")
    first = decide(uids, lookups, ReaperMemory(), 0.0, POLICY)
    assert first.announce and first.refused and "refusing to reap 4 domains at once" in first.reason
    assert "all of the node's 4 domains" in first.reason
    again = decide(uids, lookups, first.memory, 30.0, POLICY)
    assert not again.announce and again.refused == first.refused
    later = decide(uids, lookups, again.memory, POLICY.remind_s + 1, POLICY)
    assert later.announce


def test_a_mass_restarts_every_clock():
    uids, lookups = look("PPGGGG")
    verdict = decide(uids, lookups, ReaperMemory(ALL_SEEN_LONG_AGO), 1000.0, POLICY)
    assert verdict.refused and not verdict.memory.first_seen
    uids, lookups = look("PPPPGG")  # the mass ended: two candidates start their grace afresh
    after = decide(uids, lookups, verdict.memory, 1030.0, POLICY)
    assert after.reap == () and after.waiting == ("d4", "d5") and after.next_due == 1330.0


def test_unknown_restarts_the_clock():
    uids, lookups = look("PG")
    verdict = decide(uids, {**lookups, "d1": U}, ReaperMemory({"d1": 0.0}), 1000.0, POLICY)
    assert "d1" not in verdict.memory.first_seen
    verdict = decide(uids, lookups, verdict.memory, 1030.0, POLICY)
    assert verdict.reap == () and verdict.next_due == 1330.0


def test_present_again_forgets():
    uids, lookups = look("PG")
    verdict = decide(uids, {**lookups, "d1": P}, ReaperMemory({"d1": 0.0}), 1000.0, POLICY)
    assert verdict.memory.first_seen == {}


def test_next_due_is_the_earliest_grace_end():
    verdict = run("PGG", {"d1": 900.0, "d2": 950.0})
    assert verdict.waiting == ("d1", "d2") and verdict.next_due == 1200.0


def test_reaping_off_reports_kept_orphans_once():
    uids, lookups = look("PG")
    off = ReapPolicy(enabled=False)
    first = decide(uids, lookups, ReaperMemory(), 0.0, off)
    assert first.announce and first.waiting == ("d1",) and "reaping is off" in first.reason
    assert not decide(uids, lookups, first.memory, 30.0, off).announce


def test_policy_is_checked():
    with pytest.raises(ValueError):
        ReapPolicy(max_per_sweep=0)
    with pytest.raises(ValueError):
        ReapPolicy(grace_s=-1)


# ---- properties over sequences of looks ------------------------------------------------

looks = st.sampled_from([P, G, U])
sweep = st.tuples(st.floats(min_value=0, max_value=200), st.lists(looks, min_size=6, max_size=6))
policies = st.builds(ReapPolicy, enabled=st.booleans(), grace_s=st.sampled_from([0.0, 30.0, 300.0]),
                     max_per_sweep=st.integers(1, 4))


@settings(max_examples=400, deadline=None)
@given(policy=policies, domains=st.integers(1, 6), sweeps=st.lists(sweep, min_size=1, max_size=25))
def test_never_reaps_by_mistake(policy, domains, sweeps):
    """Whatever the apiserver answers: only confirmed-gone domains are reaped, never more than
    the limit, never all of a node's domains, never with reaping off, and only after an
    unbroken run of confirmed-gone looks (with no mass among them) spanning the grace."""
    uids = [f"d{i}" for i in range(domains)]
    memory, now, reaped = ReaperMemory(), 0.0, set()
    gone_since: dict[str, float] = {}  # the model: start of the current unbroken run
    for dt, states in sweeps:
        now += dt
        alive = [u for u in uids if u not in reaped]
        lookups = dict(zip(alive, states, strict=False))
        verdict = decide(alive, lookups, memory, now, policy)
        suspects = [u for u in alive if lookups[u] is not P]
        mass = len(suspects) > policy.max_per_sweep or (len(alive) > 1 and len(suspects) == len(alive))
        assert bool(verdict.refused) == mass
        for uid in alive:
            if lookups[uid] is G and not mass:
                gone_since.setdefault(uid, now)
            else:
                gone_since.pop(uid, None)
        assert set(verdict.reap) <= {u for u in alive if lookups[u] is G}
        assert len(verdict.reap) <= policy.max_per_sweep
        assert len(alive) <= 1 or len(verdict.reap) < len(alive)
        if not policy.enabled or mass:
            assert verdict.reap == ()
        for uid in verdict.reap:
            assert now - gone_since[uid] >= policy.grace_s
        if policy.enabled and not mass:  # and everything due is reaped (no orphan kept for ever)
            due = {u for u, t in gone_since.items() if now - t >= policy.grace_s}
            assert set(verdict.reap) == due
        reaped |= set(verdict.reap)
        for uid in verdict.reap:
            gone_since.pop(uid)
        memory = verdict.memory
