"""XLA flags of the engine's command buffers: merged into XLA_FLAGS before JAX starts, the user's flags kept,
nothing changed (with a warning) once the backends run."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dwdp_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_merged_keeps_the_users_flags():
  user = "--xla_force_host_platform_device_count=8  --xla_gpu_graph_min_graph_size=5"
  out = xla_flags.merged(user, xla_flags.COMMAND_BUFFER_FLAGS["engine"])
  assert out.split() == ["--xla_force_host_platform_device_count=8", "--xla_gpu_graph_min_graph_size=5",
                         "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"]
  assert xla_flags.merged("", xla_flags.COMMAND_BUFFER_FLAGS["xla_default"]) == ""


def test_configure_before_jax_starts_sets_the_flags():
  code = ("import os; from dwdp_jax import xla_flags; print(xla_flags.configure('engine')); import jax; "
          "jax.devices(); print(os.environ['XLA_FLAGS'])")
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split("\n")
  assert out[0] == out[1]
  assert out[0].split()[0] == "--xla_force_host_platform_device_count=2"
  assert "--xla_gpu_graph_min_graph_size=1" in out[0].split()


def test_configure_after_jax_started_changes_nothing(monkeypatch, caplog):
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with caplog.at_level(logging.WARNING):
    assert xla_flags.configure("engine") == "--xla_force_host_platform_device_count=8"
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  assert "not applied" in caplog.text
  with pytest.raises(ValueError, match="command_buffers"):
    xla_flags.configure("graphs")


def test_no_command_buffers_is_a_compile_option_this_xla_knows():
  """A DWDP rank compiles its programs with these options (`DwdpConfig.cuda_graphs=False`): a name XLA renamed or
  dropped fails here ("No such compile option"), not first on a GPU."""
  f = jax.jit(lambda x: x * 2 + 1, compiler_options=xla_flags.NO_COMMAND_BUFFERS)
  assert float(f(jnp.float32(3.0))) == 7.0
  with pytest.raises(Exception, match="No such compile option"):
    jax.jit(lambda x: x, compiler_options={"xla_gpu_enable_command_buffers_typo": ""})(jnp.float32(1.0))
