"""Fixtures shared by several test files."""

import os

import jax
import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` sends the tests marked `xdist_group(name)` to one worker by a `@name` suffix that
    pytest-xdist's worker adds to their node ids. pytest-xdist 3.8 writes it to `item._nodeid`, which pytest 9.2
    no longer reads (the id lives in `item._id`): the suffix was silently lost and the group's tests spread over the
    workers, each worker building the shared module fixtures again. Add the suffix where xdist's did not land."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if not names or "@" in item.nodeid:
            continue
        nodeid = f"{item.nodeid}@{'_'.join(names)}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(nodeid)
        else:
            item._nodeid = nodeid


@pytest.fixture(scope="session", autouse=True)
def cpu_compiles_cheaply():
    """On CPU the tests spend most of their time compiling (tiny models, kernels in interpret mode): XLA compiles
    with its cheapest code generation there (`jax_disable_most_optimizations`: LLVM at -O0 without its expensive
    passes, as the benchmark smoke tests' XLA flags), about a third faster; the subprocesses the tests start inherit
    it. The programs are the same; a GPU run keeps XLA's optimizations."""
    if jax.default_backend() != "cpu":
        yield
        return
    old, old_env = jax.config.values["jax_disable_most_optimizations"], os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    yield
    jax.config.update("jax_disable_most_optimizations", old)
    if old_env is None:
        del os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
    else:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = old_env


@pytest.fixture
def sync_dispatch():
    """CPU dispatch in program order (device-ordered fetch backends on CPU run their copies when the device
    reaches them, which needs synchronous dispatch); restored afterwards."""
    old = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", old)
