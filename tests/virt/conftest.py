"""Fixtures for the real-libvirt hypervisor tests: a Hypervisor and instances on it.

The private libvirtd and the tiny-guest pool come from novalet_dev.testing (``libvirt_uri``,
``libvirt_domain_type``, ``image_pool``).
A missing prerequisite fails with what to install; these fixtures never skip.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from novalet_dev.testing import TINY


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def hv(libvirt_uri, libvirt_domain_type, image_pool, state_dir):
    """A Hypervisor on the private libvirtd; every instance a test created is deleted afterwards."""
    from novalet.virt.hypervisor import Hypervisor

    h = Hypervisor(libvirt_uri, image_pool, state_dir, libvirt_domain_type)
    created: list[str] = []
    h.test_created = created  # type: ignore[attr-defined]
    try:
        yield h
    finally:
        for uid in created:
            try:
                h.undefine_and_delete(uid)
            except Exception as e:  # noqa: BLE001 - report, keep cleaning
                print(f"cleanup of {uid} failed: {e}")
        h.close()


@pytest.fixture
def new_instance(hv):
    """new_instance(image="tiny", vcpus=1, memory_mib=128) -> InstanceSpec (defined, not started)."""
    from novalet.virt.hypervisor import InstanceSpec

    def make(image: str = TINY, vcpus: int = 1, memory_mib: int = 128) -> InstanceSpec:
        uid = str(uuid.uuid4())
        hv.test_created.append(uid)
        spec = InstanceSpec(uid=uid, namespace="test", name=f"vm-{uid[:8]}", vcpus=vcpus,
                            memory_mib=memory_mib, image=image, node="node-1")
        hv.define(spec)
        return spec

    return make
