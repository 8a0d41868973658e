"""Realistic routing skew for random-weight experiments: router biases calibrated to a Zipf expert load.

With random weights every expert gets about the same load, which flatters selective prefetch (no hot set) and
hides placement effects. `make_skew` computes, per MoE layer, an `e_score_correction_bias` (and a router scale)
such that routing random hidden states through `dwdp_jax.routing.route` (group-limited top-k included) gives a
target load: Zipf shares p_i ~ i**-s over a per-layer random permutation of the experts.

Calibration: tokens x ~ N(0, I) (what RMSNorm-ed hidden states look like to the router); the router is scaled so
the logits have standard deviation `logit_std` (1.0: sigmoid scores spread over about 0.27-0.73, so routing
stays token-dependent; a tiny random init makes all tokens pick the same experts and no bias can then spread
them). The logits of a fixed sample (drawn as z @ sqrt(W^T W), the distribution of x @ W) are routed through
`route` with an identity router, so each iteration costs a top-k over [tokens, E]. The bias follows the
iterative proportional update `b <- b + lr * clip(log(target / achieved), -1, 1)` with a decaying rate;
accuracy is then measured on a fresh sample.

Defaults, and why:
* exponent s = 0.5 (`DEFAULT_EXPONENT`). At E = 256 the hottest expert gets ~8x the mean load and the hottest
  1/8 of the experts carry ~32% of routed tokens (uniform: 12.5%). DeepSeek-V3's bias-balanced training aims
  at uniform load over large mixed batches, but serving traffic is domain-specific and per-step loads show hot
  experts at several times the mean (the reason EPLB replicates experts), so s = 0.5 is a moderate, not an
  extreme, case. s = 0 is the balanced ideal; s = 1 (classic Zipf) is a stress case whose top share at E = 256
  (16%) exceeds the 1/k = 12.5% an expert can take with k = 8 (every token picking it), so targets are capped
  at 1/k and the excess spread over the others. This is an assumption until a trace of real R1 routing is
  recorded (`RouterStats`): replace the default by the exponent fitted to that trace.
* logit_std = 1.0, num_tokens = 8192, iters = 150, lr = 0.1: total variation (fresh sample) about 0.02 on 16
  and 64 experts and about 0.04 on R1's 256 experts (8 per token, 4 of 8 groups), for s = 0.5 and s = 1; much of
  the remainder is the sampling noise of the measurement. About 15 s per R1 layer on 2 CPU cores.
* rank_mix = 0 (all ranks share the hot set). rank_mix = a mixes a fraction a of a per-rank Zipf (its own
  permutation) into each rank's target and returns one bias per rank: a knob for rank-dependent traffic
  (different request domains per rank). Per-rank biases make the ranks' routers differ, so use it only with
  random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.config import ModelConfig
from dwdp_jax.routing import expert_histogram, route

DEFAULT_EXPONENT = 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class SkewSpec:
    """Calibrated skew for the MoE layers of a model.

    bias_le: [num_layers, E] float32 `e_score_correction_bias` per MoE layer, or [num_ranks, num_layers, E]
      when made with rank_mix > 0 (index by rank first).
    router_scale_l: [num_layers] factor to multiply each layer's router weights by (1.0 when left alone).
    target_le, achieved_le: same shape as bias_le, target and achieved (fresh sample) routed shares.
    exponent: the Zipf exponent s.
    """

    bias_le: np.ndarray
    router_scale_l: np.ndarray
    target_le: np.ndarray
    achieved_le: np.ndarray
    exponent: float

    @property
    def max_total_variation(self) -> float:
        """Worst total variation between target and achieved shares over layers (and ranks)."""
        return float(np.max(0.5 * np.abs(self.target_le - self.achieved_le).sum(-1)))

    def save(self, path: str | os.PathLike):
        """Writes the spec as .npz (no pickle)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                bias_le=self.bias_le,
                router_scale_l=self.router_scale_l,
                target_le=self.target_le,
                achieved_le=self.achieved_le,
                exponent=np.float64(self.exponent),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SkewSpec":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["bias_le"], z["router_scale_l"], z["target_le"], z["achieved_le"], float(z["exponent"]))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """0.5 * sum |p - q| of two distributions (normalized here)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def cap_shares(share_e: np.ndarray, max_share: float) -> np.ndarray:
    """Water-fills `share_e` so no entry exceeds max_share (excess goes to the others in proportion)."""
    p = np.asarray(share_e, np.float64) / np.sum(share_e)
    if max_share * p.size < 1.0 - 1e-12:
        raise ValueError(f"max_share={max_share} cannot hold {p.size} experts summing to 1")
    capped = np.zeros(p.size, bool)
    for _ in range(p.size):
        over = (p > max_share + 1e-15) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - max_share * capped.sum()
        rest = p[~capped].sum()
        p = np.where(capped, max_share, p * (free / rest if rest > 0 else 0.0))
    return p


def zipf_shares(
    num_experts: int, exponent: float, *, max_share: float = 1.0, permutation: np.ndarray | None = None
) -> np.ndarray:
    """[E] shares ~ rank**-exponent, capped at max_share; expert permutation[i] gets the i-th largest share."""
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    ranked = cap_shares(np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent, max_share)
    if permutation is None:
        return ranked
    permutation = np.asarray(permutation)
    if sorted(permutation.tolist()) != list(range(num_experts)):
        raise ValueError("permutation must be a permutation of range(num_experts)")
    out = np.empty(num_experts)
    out[permutation] = ranked
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def _shares_from_logits(logits_te: jnp.ndarray, bias_e: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    e = logits_te.shape[1]
    ids, _ = route(logits_te, jnp.eye(e, dtype=jnp.float32), bias_e, cfg)
    return expert_histogram(ids, e) / ids.size


@functools.partial(jax.jit, static_argnames=("iters", "cfg"))
def _calibrate_loop(logits_te, log_target_e, floor: float, lr: float, iters: int, cfg: ModelConfig) -> jnp.ndarray:
    def body(i, bias_e):
        achieved = _shares_from_logits(logits_te, bias_e, cfg)
        # Clipped: an expert far below target (log ratio ~10) would otherwise jump past every other expert and
        # the iteration oscillates (seen at E = 256).
        ratio = jnp.clip(log_target_e - jnp.log(jnp.maximum(achieved, floor)), -1.0, 1.0)
        bias_e = bias_e + lr / (1.0 + 0.02 * i) * ratio
        return bias_e - bias_e.mean()  # only differences matter; keep the numbers centred

    return jax.lax.fori_loop(0, iters, body, jnp.zeros_like(log_target_e))


def _logits(router_de: np.ndarray, num_tokens: int, seed: int) -> np.ndarray:
    """[num_tokens, E] float32 logits x @ router_de for x ~ N(0, I), sampled as z @ sqrt(router^T router).

    Same distribution as drawing hidden states, at O(E^2) per token instead of O(hidden * E).
    """
    w = np.asarray(router_de, np.float64)
    evals, evecs = np.linalg.eigh(w.T @ w)
    root = (evecs * np.sqrt(np.maximum(evals, 0.0))) @ evecs.T  # symmetric square root of the Gram matrix
    z = np.random.default_rng(seed).standard_normal((num_tokens, w.shape[1]))
    return (z @ root).astype(np.float32)


def router_scale_for(router_de: np.ndarray, logit_std: float) -> float:
    """Factor for router_de [D, E] giving logits of standard deviation logit_std for tokens x ~ N(0, I)."""
    std = float(np.sqrt(np.mean(np.sum(np.square(np.asarray(router_de, np.float64)), axis=0))))
    if std == 0.0:
        raise ValueError("router weights are all zero: cannot scale them")
    return logit_std / std


def achieved_shares(
    router_de: np.ndarray,
    bias_e: np.ndarray,
    cfg: ModelConfig,
    *,
    router_scale: float = 1.0,
    num_tokens: int = 8192,
    seed: int = 1,
) -> np.ndarray:
    """[E] routed share of each expert for N(0, I) tokens through `route`."""
    logits = _logits(np.asarray(router_de) * router_scale, num_tokens, seed)
    return np.asarray(_shares_from_logits(jnp.asarray(logits), jnp.asarray(bias_e, jnp.float32), cfg), np.float64)


def calibrate_bias(
    router_de: np.ndarray,
    cfg: ModelConfig,
    target_e: np.ndarray,
    *,
    router_scale: float = 1.0,
    num_tokens: int = 8192,
    iters: int = 150,
    lr: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """[E] float32 bias making `route` on N(0, I) tokens reproduce the routed shares target_e [E].

    router_de: [hidden, E] router weights (times router_scale). The target is capped at 1/num_experts_per_tok
    first (no expert can take more).
    """
    e = cfg.n_routed_experts
    if np.shape(router_de)[1] != e or np.shape(target_e) != (e,):
        raise ValueError(f"router_de must be [hidden, {e}] and target_e [{e}]")
    target = cap_shares(target_e, 1.0 / cfg.num_experts_per_tok)
    logits = jnp.asarray(_logits(np.asarray(router_de) * router_scale, num_tokens, seed))
    floor = 0.1 / (num_tokens * cfg.num_experts_per_tok)
    log_target = jnp.asarray(np.log(np.maximum(target, floor)), jnp.float32)
    return np.asarray(_calibrate_loop(logits, log_target, floor, lr, iters, cfg))


def make_skew(
    cfg: ModelConfig,
    routers_lde: np.ndarray | None = None,
    *,
    exponent: float = DEFAULT_EXPONENT,
    num_ranks: int = 1,
    rank_mix: float = 0.0,
    logit_std: float | None = 1.0,
    num_tokens: int = 8192,
    iters: int = 150,
    seed: int = 0,
) -> SkewSpec:
    """Calibrates a Zipf(exponent) load for every MoE layer of `cfg`.

    routers_lde: [num_moe_layers, hidden, E] router weights of the model. None: a router whose logits are iid
      N(0, 1) (what an N(0, 1/hidden) init gives in high dimension); `router_scale_l` is then all ones, and a
      model router should be scaled with `router_scale_for(w, logit_std)` before using the biases.
    logit_std: rescale each router to this logit standard deviation (None: keep the weights as they are).
    num_ranks, rank_mix: see the module docstring; rank_mix > 0 returns [num_ranks, L, E] arrays.
    Hot experts differ per layer (a seeded random permutation each).
    """
    if not 0.0 <= rank_mix <= 1.0:
        raise ValueError(f"rank_mix must be in [0, 1], got {rank_mix}")
    num_layers, e, d = cfg.num_moe_layers, cfg.n_routed_experts, cfg.hidden_size
    rng = np.random.default_rng(seed)
    if routers_lde is None:
        routers_lde = np.broadcast_to(np.eye(e), (num_layers, e, e))
    routers_lde = np.asarray(routers_lde)
    if routers_lde.shape[0] != num_layers or routers_lde.shape[2] != e or routers_lde.shape[1] not in (d, e):
        raise ValueError(f"routers_lde must be [{num_layers}, {d}, {e}], got {routers_lde.shape}")
    cap = 1.0 / cfg.num_experts_per_tok

    def zipf_per_layer():  # [L, E], a fresh hot-expert permutation per layer
        perms = [rng.permutation(e) for _ in range(num_layers)]
        return np.stack([zipf_shares(e, exponent, max_share=cap, permutation=p) for p in perms])

    shared = zipf_per_layer()
    if rank_mix > 0:  # a convex mix of capped shares stays under the cap
        targets = np.stack([(1 - rank_mix) * shared + rank_mix * zipf_per_layer() for _ in range(num_ranks)])
    else:
        targets = shared[None]
    scales = np.ones(num_layers)
    if logit_std is not None:
        scales = np.array([router_scale_for(router, logit_std) for router in routers_lde])
    bias = np.zeros(targets.shape, np.float32)
    achieved = np.zeros(targets.shape)
    for r in range(targets.shape[0]):
        for l in range(num_layers):
            kw = dict(router_scale=scales[l], num_tokens=num_tokens)
            bias[r, l] = calibrate_bias(routers_lde[l], cfg, targets[r, l], iters=iters, seed=seed + 1, **kw)
            achieved[r, l] = achieved_shares(routers_lde[l], bias[r, l], cfg, seed=seed + 2, **kw)
    squeeze = (lambda a: a[0]) if rank_mix == 0 else (lambda a: a)
    return SkewSpec(squeeze(bias), scales, squeeze(targets), squeeze(achieved), float(exponent))



def apply_skew(model, spec: SkewSpec, rank: int | None = None, logit_std: float | None = None) -> None:
    """Installs a skew spec (bias_le [L, E]) into a `DeepseekV3`'s MoE routers, in place: each MoE layer's
    router is multiplied by `router_scale_l[l]` (or, with `logit_std`, by `router_scale_for(router, logit_std)`,
    for a spec calibrated without the model's routers) and its correction bias set to `bias_le[l]` (or
    `bias_le[rank, l]` for a per-rank spec)."""
    bias = spec.bias_le if spec.bias_le.ndim == 2 else spec.bias_le[rank if rank is not None else 0]
    moe_layers = [layer for layer in model.layers if layer.is_moe]
    if len(moe_layers) != bias.shape[0]:
        raise ValueError(f"spec has {bias.shape[0]} MoE layers, the model {len(moe_layers)}")
    for l, layer in enumerate(moe_layers):
        moe = layer.mlp
        router = moe.router[...]
        scale = spec.router_scale_l[l] if logit_std is None else router_scale_for(np.asarray(router), logit_std)
        moe.router[...] = router * float(scale)
        moe.bias[...] = jnp.asarray(bias[l], moe.bias[...].dtype)
