"""DARE: drop and rescale (Yu et al., ICML 2024, arXiv 2311.03099).

m ~ Bernoulli(density) per element, tau' = m * tau / density (the exact rescale keeps E[tau'] = tau).
``rescale: l1`` is mergekit's rule instead: tau' = m * tau * ||tau||_1 / ||m * tau||_1 per tensor.
The random stream is keyed by (seed, tensor name, model index, element index): the same seed gives the
same output whatever the chunking, thread count or order. Then task arithmetic (``dare``, mergekit's
dare_linear) or TIES election and disjoint mean (``dare_ties``).
"""

import hashlib
from dataclasses import replace

from surgery.methods.spec import SCALE, SEED, WEIGHTS, Method, Param, Slice, Sparsify, density
from surgery.methods.ties import DISJOINT, ELECT, TIES_COMBINE


def dare_key(seed: int, name: str, model_index: int) -> int:
    """64-bit key of DARE's random stream for one (seed, tensor, model)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _bernoulli_apply(be, tau, s: Slice) -> None:
    import numpy as np

    key = dare_key(int(s.params["seed"]), s.tensor, s.model)
    from surgery.ranks import per_model

    be.dare_mask(tau, float(per_model(s.params["density"], s.model)), np.uint64(key), s.start)


RESCALE = Param(
    "rescale", "choice", "none", "after the mask: none (m tau / density), or l1: back to the L1 norm of tau "
    "(mergekit)", ("none", "l1")
)  # fmt: skip

BERNOULLI = Sparsify("bernoulli", needs_ranks=False, apply=_bernoulli_apply, on_device=True)

DARE = Method(
    name="dare",
    title="DARE (drop and rescale) + task arithmetic",
    paper="https://arxiv.org/abs/2311.03099",
    formula="out = b + scale * sum_t w_t * m_t * tau_t / density",
    sparsify=BERNOULLI,
    params=(density(0.5), SEED, SCALE, WEIGHTS, RESCALE),
)

DARE_TIES = replace(
    DARE,
    name="dare_ties",
    title="DARE + TIES sign election",
    formula="out = b + scale * disjoint_mean(elect(m_t * tau_t / density))",
    combine=TIES_COMBINE,
    params=(*DARE.params, ELECT, DISJOINT),
)
