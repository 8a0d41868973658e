"""Helpers shared by the converter and checkpoint-family tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx, traverse_util

from dwdp_jax import convert


def run_convert_cli(*args) -> int:
    """Runs the dwdp-convert entry point in-process; returns its exit code."""
    flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as exit_info:
        convert.run(["dwdp-convert", *map(str, args), "--noprogress"])
    return exit_info.value.code


def flat_params(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(model)[1]))


def assert_same_params(a, b):
    """Same parameter paths, dtypes, shapes and bytes."""
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def logits_of(models, ids):
    """Logits of models with one structure, through one jitted forward."""
    graphdef = nnx.split(models[0])[0]
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return [np.asarray(forward(nnx.split(m)[1], jnp.asarray(ids))) for m in models]
