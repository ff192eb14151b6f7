"""Which crash point a NOVALET_CRASH_AT value names (the kill itself is the crash matrix's)."""
import pytest

from novalet.agent import crashpoints
from novalet.agent.crashpoints import parse


def test_parse():
    assert parse("after_call") == ("after_call", "", "")
    assert parse("after_call@Stop") == ("after_call", "Stop", "")
    assert parse("between_steps@Create:block_device_mapping") == ("between_steps", "Create", "block_device_mapping")
    assert parse("after_started@:spawning") == ("after_started", "", "spawning")


@pytest.mark.parametrize("wanted,point,action,task_state,fires", [
    ("after_call", "after_call", "Stop", "powering_off", True),
    ("after_call", "after_claim", "Stop", "powering_off", False),
    ("after_call@Stop", "after_call", "Stop", "powering_off", True),
    ("after_call@Stop", "after_call", "Start", "powering_on", False),
    ("between_steps@Create:block_device_mapping", "between_steps", "Create", "networking", False),
    ("between_steps@Create:block_device_mapping", "between_steps", "Create", "block_device_mapping", True),
    ("between_steps@Create:block_device_mapping", "between_steps", "Rebuild", "block_device_mapping", False),
    ("after_started@:spawning", "after_started", "Create", "spawning", True),
    ("after_started@:spawning", "after_started", "Create", "networking", False),
])
def test_which_point_fires(monkeypatch, wanted, point, action, task_state, fires):
    monkeypatch.setenv("NOVALET_CRASH_AT", wanted)
    assert crashpoints._wanted("NOVALET_CRASH_AT", point, action, task_state) is fires
    monkeypatch.delenv("NOVALET_CRASH_AT")
    assert not crashpoints._wanted("NOVALET_CRASH_AT", point, action, task_state)
