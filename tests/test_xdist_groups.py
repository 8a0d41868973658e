"""The test suite's own scheduling: tests marked `xdist_group` (files sharing an expensive module fixture) must
reach pytest-xdist's `--dist loadgroup` scheduler with their group in the node id, or the group's tests spread
over the workers and each worker builds the fixtures again (session 15: pytest 9.2 stopped reading the id
xdist 3.8 writes; `tests/conftest.py` adds it)."""

import pytest


@pytest.mark.xdist_group("xdist_self_check")
def test_a_grouped_test_carries_its_group(request):
    if not getattr(request.config.option, "loadgroup", False) or not hasattr(request.config, "workerinput"):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@xdist_self_check")
