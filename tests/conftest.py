"""Fixtures shared by several test files."""

import jax
import pytest


@pytest.fixture
def sync_dispatch():
    """CPU dispatch in program order (device-ordered fetch backends on CPU run their copies when the device
    reaches them, which needs synchronous dispatch); restored afterwards."""
    old = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", old)
