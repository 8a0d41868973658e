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


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory, cpu_compiles_cheaply):
    """Every compiled program kept on disk for the session (JAX's persistent compilation cache, each entry however
    quick its compile): the tests compile the same programs many times over (the tiny model's layers per rank and
    per group, the reference forwards, the same fetch backends twice), and a repeat is read back instead of
    compiled again. This process only (not exported to the subprocesses the tests start, and one directory per
    xdist worker: no two processes write one entry). JAX writes no entry for a program with host callbacks
    (the interpret-mode kernels), so those always compile."""
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: jax.config.values[name] for name in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, -1)):
        jax.config.update(name, value)
    cc.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture
def sync_dispatch():
    """CPU dispatch in program order (device-ordered fetch backends on CPU run their copies when the device
    reaches them, which needs synchronous dispatch); restored afterwards."""
    old = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", old)
