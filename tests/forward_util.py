"""The single-device model's forward under jit, the tests' reference: one compile per input shape, where the
eager forward dispatches its ops one by one (several test files run tens of reference forwards)."""

import jax
from flax import nnx


def jitted_forward(model):
    """ids [b, s] -> logits [b, s, vocab] of `model`, its weights passed as arguments (not embedded constants)."""
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graph, state)(ids))
    return lambda ids: forward(state, ids)
