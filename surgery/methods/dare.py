"""DARE: drop and rescale (Yu et al., ICML 2024, arXiv 2311.03099).

m ~ Bernoulli(density) per element, tau' = m * tau / density (the exact rescale keeps E[tau'] = tau).
The random stream is keyed by (seed, tensor name, model index, element index): the same seed gives the
same output whatever the chunking, thread count or order. Then task arithmetic (``dare``, mergekit's
dare_linear) or TIES election and disjoint mean (``dare_ties``).
"""

import hashlib

from surgery.methods.spec import SCALE, SEED, WEIGHTS, Method, density

_PARAMS = (density(0.5), SEED, SCALE, WEIGHTS)

DARE = Method(
    name="dare",
    title="DARE (drop and rescale) + task arithmetic",
    paper="https://arxiv.org/abs/2311.03099",
    formula="out = b + scale * sum_t w_t * m_t * tau_t / density",
    sparsify="bernoulli",
    combine="sum",
    needs_base=True,
    min_models=1,
    max_models=None,
    params=_PARAMS,
)

DARE_TIES = Method(
    name="dare_ties",
    title="DARE + TIES sign election",
    paper="https://arxiv.org/abs/2311.03099",
    formula="out = b + scale * disjoint_mean(elect(m_t * tau_t / density))",
    sparsify="bernoulli",
    combine="ties",
    needs_base=True,
    min_models=1,
    max_models=None,
    params=_PARAMS,
)


def dare_key(seed: int, name: str, model_index: int) -> int:
    """64-bit key of DARE's random stream for one (seed, tensor, model)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
