"""`surgery run CONFIG.yml` on mergekit configs, checked against mergekit's math written out here.

Tiny Llama models built from a config (no download), float32, four blocks. The reference below is
mergekit 0.1.5's generalized task arithmetic and linear merge re-derived from its documented
semantics (weights applied before TIES election, ``normalize`` dividing by the sum of weights, top-k
by a full sort of |delta|), in torch on whole tensors. Float32 inputs: within 1e-5 relative.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_e2e_transformers import load_state

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(7)
        base = transformers.AutoModelForCausalLM.from_config(config).eval()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in (1, 2, 3):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[f"ft{i}"] = root / f"ft{i}"
        ft.save_pretrained(paths[f"ft{i}"])
    return paths


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- mergekit's math, re-derived ---------------------------------------------------------------------
def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    order = torch.sort(delta.abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(delta.numel())
    mask[order[:k]] = 1
    return delta * mask.reshape(delta.shape)


def outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    order = torch.sort(delta.abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(n)
    mask[order[top : top + keep]] = 1
    return delta * mask.reshape(delta.shape)


def gta(base, models, weights, *, sparsify=None, consensus=False, normalize=False, lam=1.0):
    deltas = torch.stack([sparsify(m - base, i) if sparsify else m - base for i, m in enumerate(models)])
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        mask = (deltas.sign() == majority).float()
        mixed, divisor = (deltas * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def check(out: Path, expect) -> None:
    got = load_state(out)
    states = {}
    for name, tensor in got.items():
        want = expect(name, states)
        assert tensor.dtype == want.dtype, name
        torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-7, msg=name)


def states_of(family, *keys):
    return [load_state(family[k]) for k in keys]


# -- methods -----------------------------------------------------------------------------------------
def test_task_arithmetic_with_weights_lambda_and_normalize(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family["ft1"]), "parameters": {"weight": 0.7}},
                {"model": str(family["ft2"]), "parameters": {"weight": 0.2}},
            ],
            "parameters": {"normalize": True, "lambda": 1.3},
            "dtype": "float32",
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")
    check(tmp_path / "out", lambda n, _: gta(b[n], [f1[n], f2[n]], [0.7, 0.2], normalize=True, lam=1.3))
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["method"] == "task_arithmetic"
    assert recipe["parameters"]["weights"] == pytest.approx([0.7 / 0.9, 0.2 / 0.9])


def test_ties_equal_weights_and_density(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[k])} for k in ("ft1", "ft2", "ft3")],
            "parameters": {"weight": 0.5, "density": 0.5},
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")
    check(
        tmp_path / "out",
        lambda n, _: gta(
            b[n],
            [f[n] for f in fs],
            [0.5] * 3,
            sparsify=lambda d, _: magnitude(d, 0.5),
            consensus=True,
            normalize=True,
        ),
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_weights_before_election(family, invoke, tmp_path, normalize):
    """mergekit multiplies by the weights before the sign election; normalize: false sums the agreeing
    updates instead of averaging them (bio-merge.yml)."""
    weights = {"ft1": 1.0, "ft2": [0.2, 1.5], "ft3": -0.4}
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[k]), "parameters": {"weight": w}} for k, w in weights.items()],
            "parameters": {"density": 0.5, "normalize": normalize, "int8_mask": True},
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")

    def expect(n, _):
        w = [1.0, gradient([0.2, 1.5], position(n)), -0.4]
        trim = lambda x, _: magnitude(x, 0.5)  # noqa: E731
        return gta(b[n], [f[n] for f in fs], w, sparsify=trim, consensus=True, normalize=normalize)

    check(tmp_path / "out", expect)
    again = invoke("run", cfg, "-o", tmp_path / "small", "-q", "--max-memory", "4KiB", "--threads", "3")
    assert again.exit_code == 0, again.output
    a, c = load_state(tmp_path / "out"), load_state(tmp_path / "small")
    assert all(torch.equal(a[n], c[n]) for n in a)  # streamed in tiny chunks: the same bytes


def test_ties_example_per_model_density_gradients_and_filters(family, invoke, tmp_path):
    """mergekit's examples/ties.yml on the tiny models: a density gradient, a weight gradient, weight
    filters, a different density per model."""
    models = {
        "ft1": {"density": [1, 0.7, 0.1], "weight": 1.0},
        "ft2": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
        "ft3": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
    }
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[k]), "parameters": p} for k, p in models.items()],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float32",
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")

    def expect(n, _):
        t = position(n)
        dens = [gradient([1, 0.7, 0.1], t), 0.5, 0.33]
        w = [1.0, gradient([0, 0.3, 0.7, 1], t), 0.5 if "mlp" in n else 0.0]
        trim = lambda x, i: magnitude(x, dens[i])  # noqa: E731
        return gta(b[n], [f[n] for f in fs], w, sparsify=trim, consensus=True, normalize=True)

    check(tmp_path / "out", expect)


def test_breadcrumbs_density_and_gamma(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "breadcrumbs",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family[k]), "parameters": {"weight": w}}
                for k, w in (("ft1", 0.6), ("ft2", 0.4))
            ],
            "parameters": {"density": 0.5, "gamma": 0.125},
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")
    check(
        tmp_path / "out",
        lambda n, _: gta(b[n], [f1[n], f2[n]], [0.6, 0.4], sparsify=lambda d, _: outliers(d, 0.5, 0.125)),
    )


def test_breadcrumbs_default_density_keeps_everything(family, invoke, tmp_path):
    """mergekit's breadcrumbs defaults to density 1.0, which skips the outlier removal too."""
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "breadcrumbs",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0}}],
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    (f1,) = states_of(family, "ft1")
    check(tmp_path / "out", lambda n, _: f1[n])


def test_linear_includes_the_base_as_mergekit_does(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "linear",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["ft1"]), "parameters": {"weight": 3.0}}],
            "parameters": {"weight": 1.0},
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1 = states_of(family, "base", "ft1")
    check(tmp_path / "out", lambda n, _: (3.0 * f1[n] + 1.0 * b[n]) / 4.0)


def our_dare_mask(name: str, model: int, shape, density: float, seed: int = 0) -> torch.Tensor:
    """Our counter-based DARE stream (splitmix64 of key + element index), written out again."""
    import numpy as np
    from ckpt_factory import splitmix64

    from surgery.methods.dare import dare_key

    n = math.prod(shape)
    z = splitmix64(np.uint64(dare_key(seed, name, model)) + np.arange(n, dtype=np.uint64))
    u = (z >> np.uint64(11)).astype(np.float64) / 2.0**53
    return torch.from_numpy(u < density).reshape(shape)


def l1_rescaled(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor with the L1 norm."""
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_defaults_rescale_to_the_l1_norm(family, invoke, tmp_path, method):
    """mergekit's DARE defaults: rescale: true (L1), normalize: false. With our masks, the rest of
    mergekit's math must agree."""
    weights = {"ft1": 0.6, "ft2": 0.4}
    cfg = write_config(
        tmp_path,
        {
            "merge_method": method,
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family[k]), "parameters": {"weight": w, "density": 0.4}}
                for k, w in weights.items()
            ],
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def expect(n, _):
        fs = [f1[n], f2[n]]
        masks = [our_dare_mask(n, t, b[n].shape, 0.4) for t in range(2)]
        rescale = lambda d, t: l1_rescaled(d, masks[t])  # noqa: E731
        return gta(b[n], fs, [0.6, 0.4], sparsify=rescale, consensus=method == "dare_ties")

    check(tmp_path / "out", expect)
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["parameters"]["rescale"] == "l1"


def test_dare_linear_without_rescale_keeps_the_masked_weighted_update(family, invoke, tmp_path):
    """Random masks cannot equal mergekit's: every kept entry is w * tau exactly (no 1/p), and the
    kept fraction matches the density."""
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "dare_linear",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["ft1"]), "parameters": {"weight": 0.8, "density": 0.3}}],
            "parameters": {"rescale": False},
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1 = states_of(family, "base", "ft1")
    got = load_state(tmp_path / "out")
    kept = total = 0
    for name, out in got.items():
        update = out - b[name]
        on = update != 0
        torch.testing.assert_close(update[on], 0.8 * (f1[name] - b[name])[on], rtol=1e-5, atol=1e-7)
        kept, total = kept + int(on.sum()), total + on.numel()
    assert abs(kept / total - 0.3) < 0.01, kept / total


def test_passthrough_of_one_model_copies_it(family, invoke, tmp_path):
    cfg = write_config(tmp_path, {"merge_method": "passthrough", "models": [{"model": str(family["ft2"])}]})
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    (f2,) = states_of(family, "ft2")
    check(tmp_path / "out", lambda n, _: f2[n])


# -- per-layer parameters ----------------------------------------------------------------------------
def position(name: str) -> float:
    """mergekit's t: block / (L - 1) inside the one slice of a models: config; 0 outside the blocks."""
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) / 3 if m else 0.0


def gradient(values: list[float], t: float) -> float:
    s = t * (len(values) - 1)
    i0 = int(s)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (s - i0)) * values[i0] + (s - i0) * values[i1]


def test_gradients_and_filters_per_tensor(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family["ft1"]), "parameters": {"weight": [0.0, 0.5, 1.0]}},
                {"model": str(family["ft2"]), "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}},
            ],
            "parameters": {
                "weight": 0.25,
                "lambda": [{"filter": "self_attn", "value": [0.5, 1.5]}, {"value": 1.0}],
            },
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")

    def expect(n, _):
        t = position(n)
        w2 = 1.0 if "mlp" in n else 0.25
        lam = gradient([0.5, 1.5], t) if "self_attn" in n else 1.0
        return gta(b[n], [f1[n], f2[n]], [gradient([0.0, 0.5, 1.0], t), w2], lam=lam)

    check(tmp_path / "out", expect)
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["per_tensor"]["model.layers.3.mlp.up_proj.weight"] == {"weights": [1.0, 1.0]}
    # streamed in tiny chunks on 3 threads: the same bytes
    again = invoke("run", cfg, "-o", tmp_path / "small", "-q", "--max-memory", "4KiB", "--threads", "3")
    assert again.exit_code == 0, again.output
    a, c = load_state(tmp_path / "out"), load_state(tmp_path / "small")
    assert all(torch.equal(a[n], c[n]) for n in a)


def test_ties_density_gradient(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family[k]), "parameters": {"weight": 0.4}} for k in ("ft1", "ft2", "ft3")
            ],
            "parameters": {"density": [1.0, 0.5, 0.25]},
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")

    def expect(n, _):
        d = gradient([1.0, 0.5, 0.25], position(n))
        trim = lambda x, _: magnitude(x, d)  # noqa: E731
        return gta(b[n], [f[n] for f in fs], [0.4] * 3, sparsify=trim, consensus=True, normalize=True)

    check(tmp_path / "out", expect)


def mk_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp: normalised dot, linear above |cos| 0.9995."""
    x, y = a.flatten().double(), b.flatten().double()
    nx, ny = x.norm(), y.norm()
    nx, ny = (nx if nx > 1e-8 else 1.0), (ny if ny > 1e-8 else 1.0)
    dot = float(((x / nx) * (y / ny)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_gradient_slerp_example(family, invoke, tmp_path):
    """mergekit's examples/gradient-slerp.yml, on the tiny models."""
    cfg = write_config(
        tmp_path,
        {
            "slices": [
                {
                    "sources": [
                        {"model": str(family["base"]), "layer_range": [0, 4]},
                        {"model": str(family["ft1"]), "layer_range": [0, 4]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": str(family["base"]),
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, f1 = states_of(family, "base", "ft1")

    def expect(n, _):
        knots = [0, 0.5, 0.3, 0.7, 1] if "self_attn" in n else [1, 0.5, 0.7, 0.3, 0] if "mlp" in n else [0.5]
        return mk_slerp(gradient(knots, position(n)), b[n], f1[n]).float()

    check(tmp_path / "out", expect)


def test_slerp_threshold_is_mergekits():
    from surgery.methods.interpolation import slerp_coefficients

    cos = 0.9997  # inside mergekit's linear band, outside ours
    gram = torch.tensor([[1.0, cos], [cos, 1.0]], dtype=torch.float64).numpy()
    assert list(slerp_coefficients(gram, {"t": 0.3, "linear_above": 0.9995})) == pytest.approx(
        [0.7, 0.3], abs=1e-7
    )
    assert list(slerp_coefficients(gram, {"t": 0.3})) != pytest.approx([0.7, 0.3], abs=1e-7)


def test_model_stock_without_the_cosine_clamp(family, invoke, tmp_path):
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "model_stock",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[k])} for k in ("ft1", "ft2", "ft3")],
        },
    )
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")

    def expect(n, _):
        offsets = [(f[n] - b[n]).flatten().double() for f in fs]
        cos = [
            float((x * y).sum() / max(float(x.norm() * y.norm()), 1e-6))
            for i, x in enumerate(offsets)
            for y in offsets[i + 1 :]
        ]
        c = sum(cos) / len(cos)
        k = 3 * c / (1 + 2 * c)
        return (k * sum(f[n] for f in fs) / 3 + (1 - k) * b[n]).float()

    check(tmp_path / "out", expect)


# -- convert, reproduction, refusals -----------------------------------------------------------------
def test_convert_prints_a_recipe_that_reproduces_the_run(family, invoke, tmp_path):
    data = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")],
        "parameters": {"density": 0.25, "lambda": 0.9},
        "out_dtype": "bfloat16",
    }
    cfg = write_config(tmp_path, data)
    converted = invoke("convert", cfg)
    assert converted.exit_code == 0, converted.output
    recipe = yaml.safe_load(converted.stdout)
    assert recipe["method"] == "ties" and recipe["output"]["dtype"] == "BF16"
    assert recipe["parameters"]["density"] == 0.25 and recipe["parameters"]["scale"] == 0.9
    (tmp_path / "native.yml").write_text(converted.stdout)
    assert invoke("run", cfg, "-o", tmp_path / "a", "-q").exit_code == 0
    assert invoke("run", tmp_path / "native.yml", "-o", tmp_path / "b", "-q").exit_code == 0
    assert invoke("run", tmp_path / "a" / "surgery_recipe.yaml", "-o", tmp_path / "c", "-q").exit_code == 0
    a, b, c = (load_state(tmp_path / k) for k in "abc")
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"merge_method": "ram", "parameters": {"weight": 1.0}},
            "merge_method: ram is not supported yet",
        ),
        (
            {"merge_method": "model_stock", "models": ["FT1", "FT2"], "parameters": {"filter_wise": True}},
            r"filter_wise: true \(one Model Stock ratio per row\) is not supported yet",
        ),
        (
            {"merge_method": "linear", "parameters": {"weight": 1.0, "normalize": False}},
            "linear with normalize: false is not supported yet",
        ),
        (
            {
                "merge_method": "dare_ties",
                "models": [
                    {"model": "FT1", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "FT2", "parameters": {"weight": 1.0, "density": 0.3}},
                ],
                "parameters": {"rescale": False, "normalize": True},
            },
            "different density per model with rescale: false and normalize: true",
        ),
        (
            {"merge_method": "della", "parameters": {"weight": 1.0, "density": 0.1}},
            r"della with density 0.1 with epsilon 0.15 \(keep probabilities outside \(0, 1\); mergekit "
            r"fails\) is not supported yet",
        ),
    ],
)
def test_refusals_name_the_missing_feature(family, invoke, tmp_path, data, message):
    data = {"base_model": str(family["base"]), "models": [{"model": str(family["ft1"])}], **data}
    data["models"] = [m if isinstance(m, dict) else {"model": m} for m in data["models"]]
    for m in data["models"]:
        m["model"] = str(family[m["model"].lower()]) if m["model"] in ("FT1", "FT2") else m["model"]
    cfg = write_config(tmp_path, data)
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "error: mergekit config:" in result.stderr and "hint:" in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


def stack_config(tmp_path, family, parts, **extra):
    slices = [{"sources": [{"model": str(family[m]), "layer_range": [a, b]}]} for m, a, b in parts]
    return write_config(tmp_path, {"merge_method": "passthrough", "slices": slices, **extra})


def renamed(name: str, block: int) -> str:
    return re.sub(r"layers\.\d+\.", f"layers.{block}.", name)


def test_passthrough_slices_stack_layers(family, invoke, tmp_path):
    """mergekit's examples/orcamini-platy-44layer.yml, on the tiny models: 3 + 3 blocks."""
    cfg = stack_config(tmp_path, family, [("ft1", 0, 3), ("ft2", 1, 4)])
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    f1, f2 = states_of(family, "ft1", "ft2")
    got = load_state(tmp_path / "out")
    want = {
        n: t for n, t in f1.items() if "layers." not in n and "norm.weight" != n[-11:] and "lm_head" not in n
    }
    for out_block, (src, block) in enumerate([(f1, 0), (f1, 1), (f1, 2), (f2, 1), (f2, 2), (f2, 3)]):
        want |= {renamed(n, out_block): t for n, t in src.items() if f"layers.{block}." in n}
    want |= {n: t for n, t in f2.items() if n in ("model.norm.weight", "lm_head.weight")}
    want["model.embed_tokens.weight"] = f1["model.embed_tokens.weight"]
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in got)
    config = yaml.safe_load((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    recipe = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert recipe["method"] == "passthrough"
    assert recipe["slices"] == [{"model": 0, "layers": [0, 3]}, {"model": 1, "layers": [1, 4]}]


def test_self_stack_duplicates_layers_into_their_own_tensors(family, invoke, tmp_path):
    cfg = stack_config(tmp_path, family, [("ft1", 0, 3), ("ft1", 1, 4)], dtype="float16")
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    (f1,) = states_of(family, "ft1")
    got = load_state(tmp_path / "out")
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[q.format(1)], f1[q.format(1)].half())
    assert torch.equal(got[q.format(3)], f1[q.format(1)].half())  # layer 1 again, as block 3
    assert all(t.dtype == torch.float16 for t in got.values())
    again = invoke("run", tmp_path / "out" / "surgery_recipe.yaml", "-o", tmp_path / "again", "-q")
    assert again.exit_code == 0, again.output
    assert all(torch.equal(got[n], t) for n, t in load_state(tmp_path / "again").items())


def test_passthrough_scale_and_bad_ranges_are_refused(family, invoke, tmp_path):
    cfg = stack_config(tmp_path, family, [("ft1", 0, 3)], parameters={"scale": 0.5})
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1 and "passthrough with scale is not supported yet" in result.stderr
    cfg = stack_config(tmp_path, family, [("ft1", 0, 6)])
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1 and "has no layer 4" in result.stderr
    assert not (tmp_path / "out").exists()
