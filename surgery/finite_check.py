"""The finiteness check: a job that wrote inf / NaN from finite inputs fails the run (unless
``--allow-nonfinite``), with the tensors named in plan order.

The engine counts inf / NaN in every encoded output chunk (``_Run.encode``); only a job whose count is
not zero comes here, and only then are its inputs read again to see whether they held such values
already (not ours to refuse)."""

from __future__ import annotations

from typing import Any

from surgery.errors import NonFiniteOutputError
from surgery.patch import VALUES
from surgery.plan import Plan, TensorJob


def nonfinite_from_finite(run: Any, job: TensorJob, bad: int) -> int:
    """``bad`` when a job wrote inf / NaN although every input value it read was finite, else 0
    (``run``: the engine's run, for its options, backend and streams).
    The inputs are read a second time only then (never for a healthy tensor); the verdict is per
    tensor, so it does not depend on chunking or threads."""
    if bad == 0 or run.options.allow_nonfinite:
        return 0
    if job.kind == "scatter":  # the patches' (or diffs') own values are inputs too (read whole)
        for ckpt, n in zip(run.plan.inputs[1:], job.patch_counts):
            name = job.name + VALUES if n > 0 else job.name
            if n != 0 and run.backend.nonfinite(ckpt.read(name).reshape(-1), ckpt.tensors[name].dtype.name):
                return 0
    stream = run.stream(job)
    n_inputs = None if job.kind in ("dense", "update", "pick") else 1  # keep_base, scatter: the base
    for start, count in stream.ranges:
        if run.backend.nonfinite(stream.load(start, count, None, n_inputs), "F32"):
            return 0  # an input already held inf / NaN: not ours to refuse
    return bad


def raise_nonfinite(plan: Plan, nonfinite: dict[str, int]) -> None:
    """Refuse the run: the first such tensor in plan order, and how many others."""
    order = [j.name for j in plan.jobs if j.name in nonfinite]
    first, n = order[0], nonfinite[order[0]]
    others = f" (and {len(order) - 1} more tensors)" if len(order) > 1 else ""
    raise NonFiniteOutputError(
        f"tensor {first!r} came out with {n:,} non-finite values (inf or NaN) although every "
        f"input value was finite{others}",
        hint="weights or scales that (nearly) cancel or blow up cause this, and so does a cast "
        "to float16 of values above 65504 (try --dtype bfloat16 or float32); pass "
        "--allow-nonfinite to write such values anyway",
        tensors=order,
    )
