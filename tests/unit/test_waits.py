"""A wait on the guest: answered, expired, or look again (never later than the deadline)."""
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from novalet.core.waits import POLL_S, look_again

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_an_answer_ends_the_wait_even_past_the_deadline():
    assert look_again(True, NOW - timedelta(seconds=1), NOW) == "answered"


def test_past_the_deadline_the_wait_expires():
    assert look_again(False, NOW, NOW) == "expired"
    assert look_again(False, NOW - timedelta(seconds=30), NOW) == "expired"


@given(st.floats(min_value=0.001, max_value=3600))
def test_while_waiting_the_next_look_is_never_past_the_deadline_nor_the_poll(left):
    after = look_again(False, NOW + timedelta(seconds=left), NOW)
    assert isinstance(after, float) and 0 < after <= min(left, POLL_S) + 1e-6
