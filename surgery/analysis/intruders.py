"""Intruder dimensions: Shuttleworth et al. (2024), "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228.

For a linear weight W (``[out, in]``, GPT-2 Conv1D weights ``[in, out]`` are transposed first) fine-tuned
from W0, take the top-k left singular vectors u_1..u_k of W. u_j is an *intruder dimension* when

    max_i |<u_j, u0_i>| < eps

over every left singular vector u0_i of W0 (the reduced SVD; vectors of W0's numerical null space,
whose basis is arbitrary, are left out). Full fine-tuning mostly rotates existing directions a little;
LoRA tends to add new high-ranking directions that are nearly orthogonal to all of W0's.

Mitigation (the paper's intervention) rescales the intruders' components:

    W' = W + (lam - 1) * sum_{j intruder} s_j u_j v_j^T

(lam = 1 leaves W unchanged, lam = 0 removes the intruders).

The base's SVD is the expensive part and depends only on the base tensor, so it is cached on disk keyed
by a content hash (blake2b of the raw bytes, dtype, shape and orientation): analysing several
fine-tunes of one base computes it once. Matrices are processed one at a time, so memory stays at a few
matrices whatever the model size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.analysis._common import (
    compile_include,
    layer_label,
    layer_sort_key,
    read_f32,
    require_torch,
    to_f32,
)
from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.errors import OutputError, RecipeError
from surgery.files import CONFIG, INTRUDERS
from surgery.inputs import open_input
from surgery.names import natural_key, place

SVD_CACHE_VERSION = 1
DEFAULT_EPS_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MITIGATION_NAME = INTRUDERS

# Architectures whose attention/MLP projections are transformers' Conv1D ([in, out] weights).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_CONV1D_NAME = re.compile(
    r"(?:^|\.)h\.\d+\.(?:attn|crossattention|mlp)\.(?:c_attn|q_attn|c_proj|c_fc)\.weight$"
)
# Excluded by default even inside blocks: embeddings and output heads are lookup tables, not maps.
_NOT_LINEAR = re.compile(
    r"(embed|wte|wpe|lm_head|word_embeddings|position_embeddings|token_type_embeddings|shared\.weight)"
)

# progress(done, total, matrix name, cached): called after each matrix.
Progress = Callable[[int, int, str, bool], None]


@dataclass(frozen=True)
class MatrixIntruders:
    """One matrix: for each of W's top-k left singular vectors, its best |cosine| with W0's."""

    name: str
    layer: str
    shape: tuple[int, int]  # analysed orientation, [out, in]
    transposed: bool  # True for Conv1D weights stored [in, out]
    max_cos: tuple[float, ...]  # per top-k vector u_j: max_i |<u_j, u0_i>|
    singular_values: tuple[float, ...]  # s_1..s_k of W
    base_top_singular_value: float
    base_rank: int  # left vectors of W0 compared against
    cached: bool  # W0's SVD came from the cache

    def intruders(self, eps: float) -> tuple[int, ...]:
        """Indices j (0 = largest singular value) of the intruder dimensions at ``eps``."""
        return tuple(j for j, c in enumerate(self.max_cos) if c < eps)

    def count(self, eps: float) -> int:
        return sum(c < eps for c in self.max_cos)

    def to_dict(self, eps: float) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "shape": list(self.shape),
            "transposed": self.transposed,
            "count": self.count(eps),
            "intruders": list(self.intruders(eps)),
            "max_cos": list(self.max_cos),
            "singular_values": list(self.singular_values),
            "base_top_singular_value": self.base_top_singular_value,
            "base_rank": self.base_rank,
            "cached": self.cached,
        }


@dataclass(frozen=True)
class IntruderReport:
    base: str
    finetuned: str
    k: int
    eps: float
    eps_grid: tuple[float, ...]
    matrices: tuple[MatrixIntruders, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (tensor, reason)
    lam: float | None = None  # set when the report comes from a mitigation
    output: str | None = None
    modified: tuple[str, ...] = ()  # matrices rewritten by the mitigation

    def count(self, eps: float | None = None) -> int:
        """Intruder dimensions over all matrices at ``eps`` (default: the report's)."""
        e = self.eps if eps is None else eps
        return sum(m.count(e) for m in self.matrices)

    @property
    def total(self) -> int:
        return self.count()

    def per_layer(self, eps: float | None = None) -> dict[str, int]:
        """Layer label -> intruder count, layers in network order."""
        e = self.eps if eps is None else eps
        out: dict[str, int] = {}
        for m in self.matrices:
            out[m.layer] = out.get(m.layer, 0) + m.count(e)
        return {k: out[k] for k in sorted(out, key=layer_sort_key)}

    def matrices_per_layer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.matrices:
            out[m.layer] = out.get(m.layer, 0) + 1
        return {k: out[k] for k in sorted(out, key=layer_sort_key)}

    def curve(self) -> dict[float, int]:
        """Total count as a function of eps over ``eps_grid`` (non-decreasing)."""
        return {e: self.count(e) for e in self.eps_grid}

    @property
    def cache_hits(self) -> int:
        return sum(m.cached for m in self.matrices)

    def to_dict(self) -> dict:
        out = {
            "base": self.base,
            "finetuned": self.finetuned,
            "k": self.k,
            "eps": self.eps,
            "total": self.total,
            "vectors": sum(len(m.max_cos) for m in self.matrices),
            "per_layer": self.per_layer(),
            "curve": [[e, c] for e, c in self.curve().items()],
            "cache_hits": self.cache_hits,
            "matrices": [m.to_dict(self.eps) for m in self.matrices],
            "skipped": [{"tensor": n, "reason": r} for n, r in self.skipped],
        }
        if self.lam is not None:
            out |= {"lambda": self.lam, "output": self.output, "modified": list(self.modified)}
        return out


# -- selection and orientation ----------------------------------------------------------------------
def is_conv1d(name: str, config: dict | None) -> bool:
    """A GPT-2-style Conv1D weight ([in, out])? From config ``model_type`` when known, else the name."""
    if not _CONV1D_NAME.search(name):
        return False
    model_type = (config or {}).get("model_type")
    if isinstance(model_type, str):
        return model_type in CONV1D_MODEL_TYPES
    return True  # no config: GPT-2 naming (gpt_bigcode shares it with Linear layers: pass conv1d=)


def select_matrices(
    base: Checkpoint, ft: Checkpoint, include: str | None
) -> tuple[list[str], list[tuple[str, str]]]:
    """2-D float weights of ``ft`` to analyse, and (name, reason) for those that cannot be.

    Default: 2-D weights inside the blocks (and unplaced ones), never embeddings or heads. With
    ``include``: every 2-D float tensor whose name matches the regex.
    """
    pattern = compile_include(include)
    names, skipped = [], []
    for name in sorted(ft.tensors, key=natural_key):
        info = ft.tensors[name]
        if len(info.shape) != 2 or info.dtype.kind != "float":
            continue
        if pattern is not None:
            if not pattern.search(name):
                continue
        elif _NOT_LINEAR.search(name) or place(name).position not in ("block", "unknown"):
            continue
        other = base.tensors.get(name)
        if other is None:
            skipped.append((name, f"missing in the base {base.source}"))
        elif other.shape != info.shape:
            skipped.append((name, f"shape {list(info.shape)} vs {list(other.shape)} in the base"))
        elif other.dtype.kind != "float":
            skipped.append((name, f"dtype {other.dtype.name} in the base"))
        elif min(info.shape) == 0:
            skipped.append((name, "empty matrix"))
        else:
            names.append(name)
    return names, skipped


# -- SVD cache ---------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/model-surgery/svd``, else ``~/.cache/model-surgery/svd``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "model-surgery" / "svd"


def content_key(raw: np.ndarray, dtype: str, shape: tuple[int, ...], transposed: bool) -> str:
    """blake2b of the raw tensor bytes plus everything that changes the cached SVD."""
    h = hashlib.blake2b(digest_size=20)
    meta = {"v": SVD_CACHE_VERSION, "dtype": dtype, "shape": list(shape), "transposed": transposed}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(memoryview(np.ascontiguousarray(raw).reshape(-1)).cast("B"))
    return h.hexdigest()


def _cache_load(cache_dir: Path | None, key: str, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    if cache_dir is None:
        return None
    path = cache_dir / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            u, s = data["u"], data["s"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # absent or damaged: recompute and overwrite
    if u.ndim != 2 or u.shape[0] != rows or s.shape != (u.shape[1],):
        return None
    return u, s


def _cache_store(cache_dir: Path | None, key: str, u: np.ndarray, s: np.ndarray) -> None:
    if cache_dir is None:
        return
    path = cache_dir / f"{key}.npz"
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, u=u, s=s)
        os.replace(tmp, path)  # readers never see a half-written entry
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the SVD cache {path}: {exc.strerror}",
            hint="choose another --cache-dir, or pass --no-cache",
            path=str(path),
        ) from None


def _prepare_cache(cache_dir: str | Path | None) -> Path | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the SVD cache folder {path}: {exc.strerror}",
            hint="choose another --cache-dir, or pass --no-cache",
            path=str(path),
        ) from None
    return path


# -- the analysis ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Matrix:
    """A matrix's result plus what the mitigation needs (torch tensors, analysed orientation)."""

    result: MatrixIntruders
    w: object  # torch.Tensor [out, in], float32
    u: object  # top-k left singular vectors [out, k]
    s: object  # [k]
    vh: object  # [k, in]


def _check_params(k: int, eps: float, eps_grid: Sequence[float]) -> None:
    if k < 1:
        raise RecipeError(f"--top-k must be at least 1, got {k}")
    for e in (eps, *eps_grid):
        if not 0 <= e <= 1:
            raise RecipeError(f"eps must lie in [0, 1] (a |cosine| threshold), got {e}")


def _base_basis(
    base: Checkpoint, name: str, transposed: bool, cache_dir: Path | None, device: str
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(U0 [out, r], S0 [r], cached): left singular vectors of W0 above its numerical null space."""
    torch = require_torch()
    info = base.info(name)
    raw = base.read(name)
    rows = info.shape[1] if transposed else info.shape[0]
    key = content_key(raw, info.dtype.name, info.shape, transposed) if cache_dir is not None else ""
    hit = _cache_load(cache_dir, key, rows)
    if hit is not None:
        return hit[0], hit[1], True
    w0 = _as_matrix(to_f32(raw, info.dtype.name), info.shape, transposed)
    u, s, _ = torch.linalg.svd(torch.from_numpy(w0).to(device), full_matrices=False)
    s = s.cpu().numpy().astype(np.float32)
    # Vectors of zero singular values span an arbitrary basis of the null space: not W0's directions.
    tol = (s[0] if s.size else 0.0) * max(w0.shape) * np.finfo(np.float32).eps
    keep = int(np.count_nonzero(s > tol))
    u0 = np.ascontiguousarray(u[:, :keep].cpu().numpy(), dtype=np.float32)
    s0 = np.ascontiguousarray(s[:keep])
    _cache_store(cache_dir, key, u0, s0)
    return u0, s0, False


def _as_matrix(flat: np.ndarray, shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    w = flat.reshape(shape)
    return np.ascontiguousarray(w.T) if transposed else w


def _iter_matrices(
    base: Checkpoint,
    ft: Checkpoint,
    names: list[str],
    k: int,
    cache_dir: Path | None,
    device: str,
    conv1d: bool | None,
    progress: Progress | None,
) -> Iterator[_Matrix]:
    torch = require_torch()
    config = ft.config() or base.config()
    for done, name in enumerate(names):
        info = ft.info(name)
        transposed = is_conv1d(name, config) if conv1d is None else conv1d
        u0, s0, cached = _base_basis(base, name, transposed, cache_dir, device)
        w = torch.from_numpy(_as_matrix(read_f32(ft, name), info.shape, transposed)).to(device)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        kk = min(k, s.shape[0])
        u, s, vh = u[:, :kk], s[:kk], vh[:kk]
        if u0.shape[1]:
            cos = (u.T @ torch.from_numpy(u0).to(device)).abs().amax(dim=1).cpu().numpy()
        else:  # W0 == 0: nothing of the base to align with
            cos = np.zeros(kk, np.float32)
        result = MatrixIntruders(
            name=name,
            layer=layer_label(name),
            shape=(int(w.shape[0]), int(w.shape[1])),
            transposed=transposed,
            max_cos=tuple(float(c) for c in cos),
            singular_values=tuple(float(v) for v in s.cpu()),
            base_top_singular_value=float(s0[0]) if s0.size else 0.0,
            base_rank=int(u0.shape[1]),
            cached=cached,
        )
        if progress is not None:
            progress(done + 1, len(names), name, cached)
        yield _Matrix(result, w, u, s, vh)


def find_intruders(
    base: str | Path,
    finetuned: str | Path,
    *,
    k: int = 10,
    eps: float = 0.5,
    include: str | None = None,
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    conv1d: bool | None = None,
    progress: Progress | None = None,
) -> IntruderReport:
    """Count intruder dimensions of every selected 2-D weight of ``finetuned`` against ``base``.

    ``cache_dir`` (e.g. ``default_cache_dir()``) caches the base SVDs; None computes them every time.
    ``conv1d`` forces the orientation (True: weights are [in, out]); None detects GPT-2 Conv1D.
    """
    _check_params(k, eps, eps_grid)
    cache = _prepare_cache(cache_dir)
    with open_checkpoint(base) as base_ck, open_input(finetuned, base=str(base)) as ft_ck:
        names, skipped = select_matrices(base_ck, ft_ck, include)
        _require_some(names, base, finetuned, include)
        matrices = tuple(
            m.result for m in _iter_matrices(base_ck, ft_ck, names, k, cache, device, conv1d, progress)
        )
    return IntruderReport(str(base), str(finetuned), k, eps, tuple(eps_grid), matrices, tuple(skipped))


def _require_some(names: list[str], base, finetuned, include: str | None) -> None:
    if names:
        return
    what = f"matching --include {include!r}" if include else "inside the transformer blocks"
    raise RecipeError(
        f"no 2-D weight {what} is shared by {finetuned} and {base}",
        hint="check the tensor names with `surgery inspect`, or choose tensors with --include REGEX",
    )


# -- mitigation ------------------------------------------------------------------------------------
def mitigate_intruders(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    lam: float,
    *,
    k: int = 10,
    eps: float = 0.5,
    include: str | None = None,
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    conv1d: bool | None = None,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: Progress | None = None,
) -> IntruderReport:
    """Write ``finetuned`` with each intruder component scaled by ``lam`` to ``output``.

    ``W' = W + (lam - 1) * sum_{j intruder} s_j u_j v_j^T`` for the matrices with intruders; every other
    tensor is copied bit for bit. Uses the project's checkpoint writer: staged in ``OUT/.surgery-partial``,
    renamed when complete, resumable, never into an input, a non-empty ``OUT`` only with ``overwrite``.
    Side files (config, tokenizer) come from ``finetuned``; ``surgery_intruders.json`` records the run.
    """
    from surgery.output import open_output, side_files_of
    from surgery.writer import OutputTensor, fingerprint_of, plan_layout

    _check_params(k, eps, eps_grid)
    if not np.isfinite(lam):
        raise RecipeError(f"--mitigate needs a finite lambda, got {lam}")
    out = Path(output).expanduser()
    cache = _prepare_cache(cache_dir)
    with open_checkpoint(base) as base_ck, open_input(finetuned, base=str(base)) as ft_ck:
        names, skipped = select_matrices(base_ck, ft_ck, include)
        _require_some(names, base, finetuned, include)
        params = {"lambda": lam, "k": k, "eps": eps, "include": include, "conv1d": conv1d}
        fingerprint = fingerprint_of(
            {
                "analysis": f"intruders-mitigate/{SVD_CACHE_VERSION}",
                "params": params,
                "max_shard_size": max_shard_size,
                "inputs": [base_ck.fingerprint(), ft_ck.fingerprint()],
            }
        )
        ordered = sorted(ft_ck.tensors, key=natural_key)
        layout = plan_layout(
            [OutputTensor(n, ft_ck.tensors[n].dtype.name, ft_ck.tensors[n].shape) for n in ordered],
            max_shard_size,
        )
        inputs = [Path(base).expanduser(), Path(finetuned).expanduser()]
        with open_output(out, inputs, fingerprint, overwrite=overwrite) as staged:
            writer = staged.writer(layout)
            matrices, modified = [], []
            for m in _iter_matrices(base_ck, ft_ck, names, k, cache, device, conv1d, progress):
                matrices.append(m.result)
                picked = list(m.result.intruders(eps))
                if not picked or lam == 1.0:
                    continue  # written unchanged below
                modified.append(m.result.name)
                if m.result.name in writer.done:  # resumed run: already written
                    continue
                w_new = m.w + (lam - 1.0) * ((m.u[:, picked] * m.s[picked]) @ m.vh[picked])
                info = ft_ck.info(m.result.name)
                w_new = w_new.cpu().numpy()
                w_new = np.ascontiguousarray(w_new.T if m.result.transposed else w_new).reshape(-1)
                writer.write(m.result.name, 0, _encode(w_new, info.dtype.name))
                writer.mark_done(m.result.name)
            for name in ordered:  # everything else, bit for bit
                if name not in writer.done:
                    _copy_raw(ft_ck, writer, name)
                    writer.mark_done(name)
            report = IntruderReport(
                str(base), str(finetuned), k, eps, tuple(eps_grid), tuple(matrices), tuple(skipped),
                lam=lam, output=str(out), modified=tuple(modified),
            )  # fmt: skip
            side = side_files_of(ft_ck.root)
            if CONFIG not in side and ft_ck.config() is not None:  # a LoRA adapter: its base's config
                side[CONFIG] = (json.dumps(ft_ck.config(), indent=2) + "\n").encode()
            side[MITIGATION_NAME] = (json.dumps(report.to_dict(), indent=2) + "\n").encode()
            writer.finalize(side)
    return report


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw storage of ``dtype`` with one round-to-nearest-even (the engine's encoder)."""
    from surgery.dtypes import DTYPES
    from surgery.kernels import get_backend

    if dtype == "F64":
        return x.astype(np.float64)
    return get_backend("cpu").encode(x, dtype, np.empty(x.size, DTYPES[dtype].storage))


def _copy_raw(ckpt: Checkpoint, writer, name: str, chunk_bytes: int = 64 << 20) -> None:
    info = ckpt.info(name)
    per = max(1, chunk_bytes // info.dtype.itemsize)
    for start in range(0, info.numel, per):
        count = min(per, info.numel - start)
        writer.write(name, start, ckpt.read_into(name, start, np.empty(count, info.dtype.storage)))
