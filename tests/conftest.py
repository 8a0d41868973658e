"""Fixtures shared by several test files."""

import os

import jax
import pytest


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
