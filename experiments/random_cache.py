"""Random cache contents for the benchmarks: a decode step's cost does not depend on the values, and random ones
give the router realistic inputs."""

import functools

import jax
import jax.numpy as jnp

PAGES_PER_FILL = 1024  # cache pages drawn per loop step of `randomized_pages` (72 MiB of R1 cache)


@functools.partial(jax.jit, donate_argnums=0)
def randomized_pages(pages, key):
    """The cache pages with N(0, 1) rows, filled in place, `PAGES_PER_FILL` pages a step: drawing a whole layer at
    once (4.5 GiB at B=256 / 16K) needed that much again beside a nearly full HBM and ran out of memory under
    the BFC allocator on an H100 (session 17, Finding 34); compiled for CPU, a 4.5 GiB layer's temporaries are
    36 GiB drawn at once and 0.84 GiB this way."""
    return [_filled_normal(p, jax.random.fold_in(key, i)) for i, p in enumerate(pages)]


def _filled_normal(p, key):
    """p [num_pages, ...] overwritten with N(0, 1) values chunk by chunk (the last chunk overlaps the one
    before when PAGES_PER_FILL does not divide num_pages)."""
    chunk = min(PAGES_PER_FILL, p.shape[0])

    def fill(i, p):
        start = jnp.minimum(i * chunk, p.shape[0] - chunk)
        rows = jax.random.normal(jax.random.fold_in(key, i), (chunk, *p.shape[1:]), p.dtype)
        return jax.lax.dynamic_update_slice_in_dim(p, rows, start, 0)

    return jax.lax.fori_loop(0, -(-p.shape[0] // chunk), fill, p)
