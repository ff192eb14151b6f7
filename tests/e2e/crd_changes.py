"""The CRD as a newer novalet would install it: fields added to the schema for one test, the
schema the session installed put back afterwards (the CRD is shared by the test session).

A rolling upgrade installs the new CRD first, then replaces the agents node by node: for a
while, agents of this version run against a schema that has fields they do not know.
"""
import asyncio
import contextlib
import json
import time
from typing import Any

CRD = "virtualinstances.novalet.io"
SCHEMA = "/spec/versions/0/schema/openAPIV3Schema"


def _schema(control_plane) -> dict[str, Any]:
    crd = json.loads(control_plane.kubectl("get", "crd", CRD, "-o", "json").stdout)
    return crd["spec"]["versions"][0]["schema"]


def _patch(control_plane, ops: list[dict[str, Any]]) -> None:
    control_plane.kubectl("patch", "crd", CRD, "--type", "json", "-p", json.dumps(ops))
    control_plane.wait_usable()  # the admission policies' type checker catches up with the schema


@contextlib.contextmanager
def newer_crd(control_plane, ops: list[dict[str, Any]]):
    """JSON-patch operations on the CRD (paths relative to openAPIV3Schema); restored on exit."""
    original = _schema(control_plane)
    _patch(control_plane, [{**op, "path": SCHEMA + op["path"]} for op in ops])
    try:
        yield
    finally:
        _patch(control_plane, [{"op": "replace", "path": "/spec/versions/0/schema", "value": original}])
        assert _schema(control_plane) == original


async def until_kept(write, read, timeout: float = 20.0) -> dict[str, Any]:
    """The apiserver serves a changed schema shortly after the CRD update: repeat `write()`
    until `read()` shows what it wrote (returns the object)."""
    deadline = time.monotonic() + timeout
    while True:
        await write()
        body = await read()
        if body is not None:
            return body
        if time.monotonic() > deadline:
            raise AssertionError("the apiserver kept pruning the newer fields")
        await asyncio.sleep(0.25)
