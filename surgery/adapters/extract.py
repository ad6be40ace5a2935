"""LoRA extraction: the best low-rank PEFT adapter for a full fine-tune (Eckart-Young).

For every 2-D weight the name rules place in a block, tau = f - b (GPT-2 Conv1D weights transposed to
the out x in layout peft uses) is factored by a truncated SVD, tau ~ U_r S_r V_r^T, and written as

    lora_B = U_r S_r^(1/2)   (out x r),   lora_A = S_r^(1/2) V_r^T   (r x in),   lora_alpha = r

so peft's scaling is 1 and ``merge_and_unload`` gives b + U_r S_r V_r^T. The rank is fixed (``rank``)
or the smallest r with sum_{i<=r} s_i^2 >= energy * ||tau||_F^2 (capped by ``max_rank``), written as a
per-module ``rank_pattern``. Tensors named by ``include`` that are not block matrices (embeddings, the
head, norms) are saved whole, as ``modules_to_save``. The singular vectors come from
``surgery.spectral`` (randomized with power iterations when r is much smaller than the matrix).

Each matrix is factored alone, within ``max_memory``; its factors are spilled to the output's staging
folder, and the adapter is written through ``open_output`` (lock, staging, fsync, rename; a run that
fails before writing leaves no folder behind).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from surgery.adapters.lora import PREFIX
from surgery.analysis._common import compile_include, read_f32
from surgery.analysis.intruders import is_conv1d, select_matrices
from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.dtypes import DTYPES, parse_output_dtype
from surgery.errors import MemoryBudgetError, RecipeError
from surgery.files import ADAPTER_CONFIG as CONFIG_NAME
from surgery.files import ADAPTER_WEIGHTS as WEIGHTS_NAME
from surgery.files import CARD, LORA_REPORT, STAGING
from surgery.inputs import open_input
from surgery.kernels import get_backend
from surgery.output import open_output
from surgery.writer import Layout, OutputTensor, ShardLayout, fingerprint_of, safetensors_header

REPORT_NAME = LORA_REPORT
EXTRACT_VERSION = 1

# progress(done, total, tensor name)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModuleRank:
    """One extracted matrix: its rank and how much of tau the rank-r factors keep."""

    tensor: str
    shape: tuple[int, ...]
    rank: int
    energy_kept: float  # sum_{i<=r} s_i^2 / ||tau||_F^2
    frobenius_kept: float  # ||U_r S_r V_r^T||_F / ||tau||_F = sqrt(energy_kept)
    tau_norm: float  # ||tau||_F


@dataclass(frozen=True)
class ExtractReport:
    base: str
    finetuned: str
    output: str
    modules: tuple[ModuleRank, ...]
    full: tuple[str, ...]  # tensors saved whole (modules_to_save)
    not_represented: tuple[str, ...]  # float tensors the fine-tune changed that the adapter leaves as base
    adapter_bytes: int
    rule: dict

    @property
    def energy_kept(self) -> float:
        """Over all extracted matrices: sum of kept energy / sum of ||tau||_F^2."""
        total = sum(m.tau_norm**2 for m in self.modules)
        return sum(m.energy_kept * m.tau_norm**2 for m in self.modules) / total if total else 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["energy_kept"] = self.energy_kept
        return out


@dataclass(frozen=True)
class RankRule:
    """Fixed ``rank``, or the smallest rank keeping ``energy`` of ||tau||_F^2, at most ``max_rank``."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def check(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise RecipeError("choose the rank with exactly one of --rank R and --energy E")
        if self.rank is not None and self.rank < 1:
            raise RecipeError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise RecipeError(f"--energy must be in (0, 1], got {self.energy}", hint="e.g. 0.9 keeps 90%")
        if self.max_rank is not None and self.max_rank < 1:
            raise RecipeError(f"--max-rank must be at least 1, got {self.max_rank}")

    def cap(self, m: int, n: int) -> int:
        """How many singular triplets to compute for an m x n matrix."""
        limit = min(m, n)
        if self.rank is not None:
            return min(self.rank, limit)
        return min(self.max_rank or limit, limit)

    def pick(self, s: np.ndarray, total: float) -> int:
        """The rank: fixed, or the energy rule over the computed top values of the spectrum."""
        if total <= 0.0:
            return 0
        if self.rank is not None:
            return min(self.rank, int(np.count_nonzero(s > 0)) or 1)
        cum = np.cumsum(s.astype(np.float64) ** 2)
        r = int(np.searchsorted(cum, self.energy * total * (1 - 1e-12), side="left")) + 1
        return min(r, s.size)


def svd_bytes(m: int, n: int, k: int, exact: bool) -> int:
    """Working memory of one factorisation (float32): tau and the read of the base beside it, the SVD's
    copy of tau, its factors and workspace (exact), or the sketches (randomized)."""
    if exact:
        small = min(m, n)
        return 4 * (3 * m * n + (m + n) * small + 4 * small * small)
    sketch = min(k + 10, min(m, n))
    return 4 * (2 * m * n + 4 * (m + n) * sketch)


def extract_lora(
    base: str,
    finetuned: str,
    output: str | Path,
    rule: RankRule,
    *,
    include: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    method: str = "auto",
    max_memory: int = 2 * 2**30,
    overwrite: bool = False,
    progress: Progress | None = None,
    label: str | None = None,
) -> ExtractReport:
    """Write a PEFT LoRA adapter approximating ``finetuned - base`` to ``output`` (see module doc).

    ``label`` names the fine-tune in the report and card (default: ``finetuned``)."""
    rule.check()
    out_dtype = parse_output_dtype(dtype)
    pattern = compile_include(include)
    out = Path(output).expanduser()
    with open_checkpoint(base) as base_ck, open_input(finetuned, base=str(base)) as ft_ck:
        names, _ = select_matrices(base_ck, ft_ck, None)
        if not names:
            raise RecipeError(f"no 2-D weight in the transformer blocks is shared by {finetuned} and {base}",
                              hint="check the tensor names with `surgery inspect --layers`")  # fmt: skip
        config = base_ck.config()
        full = [n for n in ft_ck.tensors if pattern and pattern.search(n) and n not in names]
        _check_full(full, base_ck, ft_ck)
        sizes = {n: ft_ck.tensors[n].shape for n in names}
        exact = {n: method == "exact" or (method == "auto" and 4 * min(rule.cap(*s) + 10, min(s)) > min(s))
                 for n, s in sizes.items()}  # fmt: skip
        too_big = [(n, svd_bytes(*sizes[n], rule.cap(*sizes[n]), exact[n])) for n in names]
        too_big = [(n, b) for n, b in too_big if b > max_memory]
        if too_big:
            name, need = max(too_big, key=lambda nb: nb[1])
            raise MemoryBudgetError(
                f"matrix {name!r} {list(sizes[name])} needs {need / 2**30:.2f} GiB to factor, over the "
                f"{max_memory / 2**30:.2f} GiB budget ({len(too_big)} matrix(es) do)",
                hint=f"raise --max-memory to at least {math.ceil(need / 2**20)}MiB, or lower the rank",
                tensor=name,
            )
        fingerprint = fingerprint_of({"extract": EXTRACT_VERSION, "rule": asdict(rule), "include": include,
                                      "dtype": out_dtype, "method": method,
                                      "inputs": [base_ck.fingerprint(), ft_ck.fingerprint()]})  # fmt: skip
        inputs = [Path(base).expanduser(), Path(finetuned).expanduser()]
        with open_output(out, inputs, fingerprint, overwrite=overwrite) as staged:
            spill = out / STAGING / "factors"  # removed with the staging folder when the adapter is done
            spill.mkdir(exist_ok=True)
            modules = []
            for i, name in enumerate(names):
                conv = is_conv1d(name, config)
                modules.append(_factor(base_ck, ft_ck, name, conv, rule, method, device, spill / f"{i}.npz"))
                if progress is not None:
                    progress(i + 1, len(names), name)
            if not any(m.rank for m in modules):
                raise RecipeError(f"{finetuned} equals {base} in every block matrix: nothing to extract")
            dropped = _changed(base_ck, ft_ck, set(names) | set(full))
            tensors, sources = _adapter_tensors(names, modules, full, ft_ck, out_dtype, spill)
            header, rel = safetensors_header(tensors, {"format": "pt"})
            offsets = {k: len(header) + v for k, v in rel.items()}
            size = len(header) + sum(t.nbytes for t in tensors)
            layout = Layout((ShardLayout(WEIGHTS_NAME, header, offsets, size),), {t.name: t for t in tensors})
            writer = staged.writer(layout)
            for t in tensors:
                if t.name not in writer.done:
                    writer.write(t.name, 0, sources[t.name]())
                    writer.mark_done(t.name)
            conv = any(is_conv1d(n, config) for n in names)
            report = ExtractReport(str(base), label or str(finetuned), str(out), tuple(modules),
                                   tuple(sorted(full)), tuple(dropped), size, asdict(rule))  # fmt: skip
            writer.finalize(_side_files(report, names, modules, full, conv, config, base))
    return report


def _check_full(full: list[str], base_ck: Checkpoint, ft_ck) -> None:
    bad = [n for n in full if ft_ck.tensors[n].dtype.kind != "float"]
    if bad:
        raise RecipeError(f"--include names non-float tensors: {', '.join(bad[:5])}",
                          hint="modules_to_save copies float weights; narrow the regex")  # fmt: skip


def _factor(base_ck, ft_ck, name: str, conv: bool, rule: RankRule, method: str, device: str,
            spill: Path) -> ModuleRank:  # fmt: skip
    """Factor one tau, keep rank r, spill (A, B) to ``spill``."""
    from surgery import spectral

    info = ft_ck.info(name)
    tau = read_f32(ft_ck, name).reshape(info.shape)
    tau -= read_f32(base_ck, name).reshape(info.shape)
    if conv:  # peft's layout: out x in
        tau = np.ascontiguousarray(tau.T)
    total = float(np.square(tau, dtype=np.float64).sum())
    m, n = tau.shape
    if total == 0.0:
        np.savez(spill, a=np.zeros((0, n), np.float32), b=np.zeros((m, 0), np.float32))
        return ModuleRank(name, info.shape, 0, 1.0, 1.0, 0.0)
    svd = spectral.truncated_svd(tau, rule.cap(m, n), method=method, device=device)
    del tau
    s = np.asarray(svd.s, np.float64)
    r = rule.pick(s, total)
    root = np.sqrt(s[:r]).astype(np.float32)
    b = np.ascontiguousarray(np.asarray(svd.u, np.float32)[:, :r] * root[None, :])
    a = np.ascontiguousarray(root[:, None] * np.asarray(svd.vh, np.float32)[:r])
    np.savez(spill, a=a, b=b)
    energy = min(1.0, float(np.square(s[:r]).sum()) / total)
    return ModuleRank(name, info.shape, r, energy, math.sqrt(energy), math.sqrt(total))


def _changed(base_ck, ft_ck, covered: set[str]) -> list[str]:
    """Float tensors outside the adapter whose bytes differ between base and fine-tune."""
    out = []
    for name, info in ft_ck.tensors.items():
        other = base_ck.tensors.get(name)
        if name in covered or info.dtype.kind != "float" or other is None or other.shape != info.shape:
            continue
        if other.dtype.name != info.dtype.name:
            out.append(name)
            continue
        step = max(1, (64 << 20) // max(1, info.dtype.itemsize))
        for start in range(0, info.numel, step):
            count = min(step, info.numel - start)
            a = base_ck.read_into(name, start, np.empty(count, info.dtype.storage))
            b = ft_ck.read_into(name, start, np.empty(count, info.dtype.storage))
            if not np.array_equal(a, b):
                out.append(name)
                break
    return sorted(out)


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _adapter_tensors(names, modules, full, ft_ck, out_dtype: str, spill: Path):
    """The adapter file's tensors and, for each, a function returning its raw bytes."""
    backend = get_backend("cpu")
    tensors, sources = [], {}

    def encoded(path: Path, key: str):
        def load() -> np.ndarray:
            x = np.load(path)[key]
            raw = np.empty(x.size, DTYPES[out_dtype].storage)
            return backend.encode(np.ascontiguousarray(x, np.float32).reshape(-1), out_dtype, raw)

        return load

    for i, (name, mod) in enumerate(zip(names, modules)):
        if mod.rank == 0:
            continue
        stem = PREFIX + module_of(name)
        path = spill / f"{i}.npz"
        with np.load(path) as z:
            a_shape, b_shape = z["a"].shape, z["b"].shape
        for key, shape in (("a", a_shape), ("b", b_shape)):
            tname = f"{stem}.lora_{key.upper()}.weight"
            tensors.append(OutputTensor(tname, out_dtype, tuple(shape)))
            sources[tname] = encoded(path, key)
    for name in sorted(full):
        info = ft_ck.tensors[name]
        tensors.append(OutputTensor(PREFIX + name, info.dtype.name, info.shape))
        sources[PREFIX + name] = lambda name=name: ft_ck.read(name).reshape(-1)
    return tensors, sources


def _side_files(report: ExtractReport, names, modules, full, conv: bool, config: dict | None,
                base: str) -> dict[str, bytes]:  # fmt: skip
    ranks = {module_of(n): m.rank for n, m in zip(names, modules) if m.rank}
    top = max(ranks.values())
    pattern = {re.escape(k): r for k, r in sorted(ranks.items()) if r != top}
    arch = ((config or {}).get("architectures") or [""])[0]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        "base_model_name_or_path": str(base),
        "r": top,
        "lora_alpha": top,  # alpha = r: scaling 1, the factors carry the singular values
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted({module_of(n) for n in full}) or None,
        "fan_in_fan_out": conv,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    card = (
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n- model-surgery\n---\n\n"
        f"# LoRA extracted by model-surgery\n\nA rank-{top} (at most) LoRA adapter of `{report.finetuned}` "
        f"over `{base}`: the best low-rank approximation (truncated SVD) of each block matrix's task "
        f"vector. It keeps {report.energy_kept:.1%} of the task vectors' squared Frobenius norm; "
        f"{REPORT_NAME} lists the rank and kept fraction of every module.\n"
    )
    return {
        CONFIG_NAME: (json.dumps(adapter_config, indent=2) + "\n").encode(),
        CARD: card.encode(),
        REPORT_NAME: (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
    }
