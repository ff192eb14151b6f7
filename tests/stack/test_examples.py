"""Every manifest in examples/ is accepted by the real apiserver (schema and CEL rules)."""
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("manifest", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid_for_the_apiserver(manifest, control_plane, crds, namespace):
    result = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(manifest))
    assert "(server dry run)" in result.stdout


def test_there_are_examples():
    assert len(EXAMPLES) >= 6
