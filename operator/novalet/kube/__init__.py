"""Kubernetes adapters: the only place that talks to the apiserver."""
from collections.abc import Callable

# Runs right before every write an adapter makes, and raises to refuse it (the agent's fence).
WriteGuard = Callable[[str], None]


def no_guard(what: str) -> None:
    return None
