"""How the MLA decode kernel's CTAs share a batch's KV pages, and how their partial results merge (pure jnp,
traced inside the caller's jit: lengths are device values).

A work unit is (request, first page, pages): one CTA per unit and 64-row tile reads those pages of that request
and writes a partial output normalized over them, with its log-sum-exp. A schedule is an int32 array
[units, 3] of (request, first page, pages) plus, per unit, the request it belongs to (`num_requests` for a
unit with nothing to do). Two schedules:
  * `uniform_schedule`: every request in the same number of splits S, its pages divided evenly: B x S units in
    request-major order, merged by `mla_combine` over the split axis (nothing to merge at S = 1). Right when
    lengths are about equal; with unequal lengths the longest request's CTAs set the time. The decode kernel
    computes these units itself from the lengths (`uniform_unit`); this is their array form.
  * `balanced_schedule`: about `num_units` units of about equal pages over the whole batch: a request gets a
    number of units proportional to its pages (at least one), each of an equal share of them. Units of a
    request are merged by `combine_units`: a one-hot contraction over the units (deterministic, no scatter).
    Its static size is num_units + B units (rounding gives a request at most one unit more than its share),
    those past the used ones empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _pages(lengths, page_size: int):
  return (lengths.astype(jnp.int32) + page_size - 1) // page_size


def uniform_unit(lengths, unit, num_splits: int, page_size: int):
  """(request, first page, pages) of `unit` (request b's split s is unit b * num_splits + s) from scalars:
  the decode kernel runs this on its lengths ref (integer ops Mosaic GPU lowers: no floor division)."""
  b, split = lax.div(unit, num_splits), lax.rem(unit, num_splits)
  pages = lax.div(lengths[b] + (page_size - 1), page_size)
  per = lax.div(pages + (num_splits - 1), num_splits)
  first = split * per
  return b, first, jnp.clip(pages - first, 0, per)


def uniform_schedule(lengths, num_splits: int, page_size: int):
  """[B * num_splits, 3] units (`uniform_unit` of every unit, in order) and their requests [B * S]."""
  units = jnp.arange(lengths.shape[0] * num_splits, dtype=jnp.int32)
  req, first, steps = jax.vmap(lambda u: uniform_unit(lengths.astype(jnp.int32), u, num_splits, page_size))(units)
  return jnp.stack([req, first, steps], -1), req


def balanced_schedule(lengths, num_units: int, min_pages: int, page_size: int):
  """[num_units + B, 3] units of about equal pages (at least `min_pages` unless a request has fewer) and their
  requests (B for an empty unit): request b gets max(1, round(pages_b / share)) units, share =
  max(min_pages, ceil(total pages / num_units)), each of ceil(pages_b / units_b) pages (the last one less)."""
  n = _pages(lengths, page_size)  # [B]
  b = n.shape[0]
  share = jnp.maximum(min_pages, (n.sum() + num_units - 1) // num_units)
  units = jnp.where(n > 0, jnp.maximum(1, (n + share // 2) // share), 0)  # [B]
  per = (n + jnp.maximum(units, 1) - 1) // jnp.maximum(units, 1)
  end = jnp.cumsum(units)
  start = end - units
  u = jnp.arange(num_units + b, dtype=jnp.int32)
  # compare_all: one [units, B] comparison, not a binary-search loop (a while on GPUs)
  req = jnp.clip(jnp.searchsorted(end, u, side="right", method="compare_all"), 0, b - 1).astype(jnp.int32)
  used = u < end[-1]
  first = (u - start[req]) * per[req]
  steps = jnp.where(used, jnp.clip(n[req] - first, 0, per[req]), 0)
  req = jnp.where(used, req, b)
  return jnp.stack([jnp.minimum(req, b - 1), first, steps], -1).astype(jnp.int32), req


def combine_units(o_units, lse_units, unit_request, num_requests: int):
  """Merges the partials of each request's units: o_units [U, R, C] (each normalized over its pages),
  lse_units [U, R] (natural log, -inf for an empty unit), unit_request [U] (num_requests: no request)
  -> (out [B, R, C] f32, lse [B, R]); a request without units gets 0 and -inf."""
  mine = unit_request[None, :] == jnp.arange(num_requests, dtype=unit_request.dtype)[:, None]  # [B, U]
  mx = jnp.max(jnp.where(mine[:, :, None], lse_units[None], -jnp.inf), axis=1)  # [B, R]
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  own = unit_request < num_requests
  w = jnp.where(own[:, None], jnp.exp(lse_units - mx[jnp.minimum(unit_request, num_requests - 1)]), 0.0)
  onehot, hi = mine.astype(jnp.float32), lax.Precision.HIGHEST  # exact 0/1 weights: a sum in f32
  tot = jnp.einsum("bu,ur->br", onehot, w, precision=hi)
  out = jnp.einsum("bu,urc->brc", onehot, w[..., None] * o_units.astype(jnp.float32), precision=hi)
  out = out / jnp.where(tot > 0, tot, 1.0)[..., None]
  lse = jnp.where(tot > 0, jnp.log(jnp.where(tot > 0, tot, 1.0)) + mx, -jnp.inf)
  return out, lse
