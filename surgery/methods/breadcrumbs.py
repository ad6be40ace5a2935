"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795).

Per task vector keep the middle band of magnitudes: drop the ``outliers`` fraction of largest |tau|,
keep the next ``density`` fraction, drop everything smaller. Ranks are exact order statistics (ties
broken by lower index), so a group of n entries keeps exactly floor(density * n) of them: the ranks
floor(outliers*n)+1 .. floor(outliers*n)+floor(density*n). Then task arithmetic on the masked vectors,
or TIES sign election (``breadcrumbs_ties``, defined in ties.py next to the TIES combine).

    out = b + scale * sum_t w_t * mask_t * tau_t

``rescale: l1`` is mergekit's ``rescale: true`` after a magnitude top-k: each masked task vector times
||tau||_1 / ||mask * tau||_1 over the tensor (one more pass; the band keeps the same entries in it).

``BAND`` is the sparsify stage of every rank-based method (TIES' top-k is a band with no outliers, a
graft and a sparse patch select a band too): the engine's reduce passes find the exact thresholds of
each tensor, row or the whole model (``granularity``), and the mask keeps the band in place.
"""

from surgery.methods.spec import (
    SCALE,
    WEIGHTS,
    Method,
    Param,
    Slice,
    Sparsify,
    density,
    granularity,
    outliers,
)


def _band_apply(be, tau, s: Slice) -> None:
    if s.band is None:  # ranks per row: thresholds of each row, computed in the kernel
        from surgery.ranks import band_ranks

        r_hi, r_lo = band_ranks(s.params, s.cols, s.model)
        be.row_band_mask(tau, s.cols, r_hi, r_lo, s.scratch)
    else:
        b = s.band
        be.band_mask(tau, b.v_hi, b.ties_hi, b.v_lo, b.ties_lo, b.seen)


BAND = Sparsify("band", needs_ranks=True, apply=_band_apply, on_device=True)

RESCALE_L1 = Param(
    "rescale", "choice", "none", "after the mask: none, or l1: back to the L1 norm of tau (mergekit's "
    "rescale: true)", ("none", "l1")
)  # fmt: skip

BREADCRUMBS = Method(
    name="breadcrumbs",
    title="Model Breadcrumbs",
    paper="https://arxiv.org/abs/2312.06795",
    formula="out = b + scale * sum_t w_t * band_mask_t * tau_t",
    sparsify=BAND,
    params=(density(0.10), outliers(0.01), granularity(), SCALE, WEIGHTS, RESCALE_L1),
)
