"""A stopping agent never waits on an apiserver that does not answer: the Lease's release is
bounded, and the Lease then expires on its own (a standby takes over after its duration)."""
import asyncio
from types import SimpleNamespace

from novalet.agent import main


class Queue:
    async def stop(self):
        pass


class Events:
    async def flush(self, timeout_s):
        return True

    async def close(self, timeout_s):
        pass


class HungLease:
    released = False

    async def release(self):
        await asyncio.sleep(3600)  # an apiserver that accepted the connection and never answers


class Catalog:
    async def close(self):
        return None


class RefusedLease:
    async def release(self):
        raise ConnectionRefusedError("Cannot connect to host 127.0.0.1:6443")


async def stop_with(lease, monkeypatch) -> None:
    monkeypatch.setattr(main, "RELEASE_TIMEOUT_S", 0.05)
    agent = SimpleNamespace(background=[], lease_held=asyncio.Event(), activation=None, queue=Queue(),
                            lease=lease, node="n1", events=Events(), catalog=Catalog())
    await asyncio.wait_for(main.Agent.stop(agent), timeout=5)


async def test_a_release_that_hangs_does_not_hold_the_stop(monkeypatch, caplog):
    await stop_with(HungLease(), monkeypatch)
    assert "could not release the Lease of node n1" in caplog.text


async def test_a_refused_release_does_not_fail_the_stop(monkeypatch, caplog):
    await stop_with(RefusedLease(), monkeypatch)
    assert "Cannot connect" in caplog.text
