"""End to end: tiny transformers models -> `surgery merge` (CLI) -> load with transformers -> logits.

Models are built from configs (no download): a Llama-like model, untied in bfloat16 and tied in float32,
and a GPT-2-like model (tied; its Conv1D weights are stored [in, out]) in float32. Fine-tunes are the
base plus small seeded perturbations, saved in several shards. Each merge is checked against a
reference computed here in torch straight from the input files, with independent code: ranks by a full
stable sort on (|tau| descending, flattened index ascending), float32 math, one rounding at the end.
Equal weights must give equal tensors (bit for bit) and equal logits.
"""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CLI_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BITS = {2: torch.int16, 4: torch.int32}


# -- tiny models ------------------------------------------------------------------------------------
def make_config(arch: str):
    if arch.startswith("llama"):
        return transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=arch == "llama_tied",
        )
    return transformers.GPT2Config(
        vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tiny word-level tokenizer (tokenizers library, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.save_pretrained(folder)


FAMILIES = {  # arch -> dtype the checkpoints are saved in
    "llama_untied": torch.bfloat16,
    "llama_tied": torch.float32,
    "gpt2": torch.float32,
}


def build_family(arch: str, root: Path) -> dict:
    """Base (seeded init) + 2 fine-tunes (base + seeded perturbations), saved sharded."""
    config = make_config(arch)
    dtype = FAMILIES[arch]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        base = transformers.AutoModelForCausalLM.from_config(config).eval()
    paths = {"base": root / "base", "models": []}
    base.to(dtype).save_pretrained(paths["base"], max_shard_size="100KB")
    if arch == "llama_untied":
        save_tokenizer(paths["base"], config.vocab_size)
    for i in (1, 2):
        ft = copy.deepcopy(base).float()
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in ft.parameters():  # tied parameters appear once: the tie survives
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        path = root / f"ft{i}"
        ft.to(dtype).save_pretrained(path, max_shard_size="100KB")
        paths["models"].append(path)
    return paths


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in cache:
            cache[arch] = build_family(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


# -- reading and the reference merge ----------------------------------------------------------------
def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) checkpoint folder, with safetensors' own loader."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(folder / "model.safetensors"))
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for fname in files:
        state.update(load_file(str(folder / fname)))
    return state


def rank_count(fraction: float, n: int) -> int:
    """floor(fraction * n) for the decimal the user wrote."""
    return math.floor(Fraction(str(fraction)) * n)


def band_mask(tau: torch.Tensor, outliers: float, density: float) -> torch.Tensor:
    """Keep ranks floor(outliers*n)+1 .. floor(outliers*n)+floor(density*n) of |tau| (1-based), ranks
    ordered by |tau| descending then flattened index ascending."""
    flat = tau.reshape(-1)
    n = flat.numel()
    r_hi = rank_count(outliers, n)
    r_lo = min(n, r_hi + rank_count(density, n))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[r_hi:r_lo]] = True
    return mask.view(tau.shape)


def row_band_mask(tau: torch.Tensor, outliers: float, density: float) -> torch.Tensor:
    """The same band taken independently in every row (last dimension)."""
    rows = tau.reshape(-1, tau.shape[-1])
    return torch.stack([band_mask(r, outliers, density) for r in rows]).view(tau.shape)


def reference_merge(base: dict, models: list[dict], method: str, params: dict, out_dtype) -> dict:
    """out = b + scale * combine(sparsify(tau_t)), in float32, rounded once to the output dtype."""
    weights = params.get("weights", [1.0] * len(models))
    scale = params.get("scale", 1.0)
    out = {}
    for name, b_raw in base.items():
        b = b_raw.float()
        taus = [m[name].float() - b for m in models]
        if method in ("breadcrumbs", "ties"):
            if method == "breadcrumbs":
                outliers, density = params.get("outliers", 0.01), params.get("density", 0.1)
            else:
                outliers, density = 0.0, params.get("density", 0.2)
            masker = row_band_mask if params.get("granularity") == "per_row" else band_mask
            taus = [torch.where(masker(t, outliers, density), t, torch.zeros_like(t)) for t in taus]
        if method == "ties":
            total = taus[0]
            for t in taus[1:]:
                total = total + t
            num = torch.zeros_like(b)
            den = torch.zeros_like(b)
            for w, t in zip(weights, taus):
                agree = (t != 0) & (torch.sign(t) == torch.sign(total))
                num = num + torch.where(agree, w * t, torch.zeros_like(t))
                den = den + torch.where(agree, torch.full_like(t, w), torch.zeros_like(t))
            merged = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), 0.0)
        else:  # task arithmetic and breadcrumbs: weighted sum, model by model
            merged = weights[0] * taus[0]
            for w, t in zip(weights[1:], taus[1:]):
                merged = merged + w * t
        out[name] = (b + scale * merged).to(out_dtype or b_raw.dtype)
    return out


def assert_same_bits(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for name in ref:
        a, b = got[name], ref[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if not torch.equal(a.view(BITS[a.element_size()]), b.view(BITS[b.element_size()])):
            diff = (a.float() - b.float()).abs()
            pytest.fail(f"{name}: {int((diff > 0).sum())} of {a.numel()} differ, max {diff.max().item()}")


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


# -- the merges -------------------------------------------------------------------------------------
CASES = [
    ("llama_untied", "task_arithmetic", {}, None),
    ("llama_untied", "breadcrumbs", {"density": 0.3, "outliers": 0.05}, None),
    ("llama_untied", "breadcrumbs", {"density": 0.5, "outliers": 0.1, "granularity": "per_row"}, None),
    ("llama_untied", "ties", {"density": 0.3}, None),
    ("llama_tied", "task_arithmetic", {"weights": [1.0, 0.5], "scale": 0.5}, None),
    ("llama_tied", "breadcrumbs", {}, None),
    ("llama_tied", "ties", {}, "bfloat16"),
    ("gpt2", "task_arithmetic", {}, "bfloat16"),
    ("gpt2", "breadcrumbs", {"density": 0.4, "outliers": 0.02}, "float16"),
    ("gpt2", "ties", {"density": 0.25}, None),
]


def case_id(case) -> str:
    arch, method, params, dtype = case
    extra = "-".join(f"{k}={v}" for k, v in params.items() if k != "weights")
    return "-".join(x for x in (arch, method, extra, dtype) if x)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_merge_loads_and_matches_reference(case, families, invoke, tmp_path):
    arch, method, params, dtype = case
    fam = families(arch)
    base_dir, model_dirs = fam["base"], fam["models"]
    out = tmp_path / "merged"
    args = ["merge", *model_dirs, "--base", base_dir, f"--{method.replace('_', '-')}", "-o", out, "-q"]
    for key, value in params.items():
        args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else value]
    if dtype:
        args += ["--dtype", dtype]
    args += ["--max-shard-size", "40KB", "--threads", "2", "--max-memory", "64KiB"]
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)

    # tensors: bit for bit equal to the independent reference
    base_state = load_state(base_dir)
    model_states = [load_state(m) for m in model_dirs]
    assert len(list(base_dir.glob("model-*.safetensors"))) >= 2  # the inputs really are sharded
    ref = reference_merge(base_state, model_states, method, params, CLI_DTYPE.get(dtype))
    got = load_state(out)
    assert_same_bits(got, ref)
    tied = arch != "llama_untied"
    assert ("lm_head.weight" in got) == (not tied)
    assert any(not torch.equal(got[n], base_state[n].to(got[n].dtype)) for n in got)  # something merged

    # the output loads in transformers, and its logits equal the reference model's
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = transformers.AutoConfig.from_pretrained(base_dir)
    ref_model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = ref_model.load_state_dict({k: v.float() for k, v in ref.items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        assert (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        )
    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    merged_logits = logits_of(model, input_ids)
    torch.testing.assert_close(merged_logits, logits_of(ref_model, input_ids), rtol=1e-6, atol=1e-6)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert not torch.allclose(merged_logits, logits_of(base_model, input_ids), atol=1e-4)

    # side files: config (dtype updated), tokenizer, index, card, recipe
    base_cfg = json.loads((base_dir / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    expected_dtype = dtype or base_cfg["dtype"]
    assert out_cfg == {**base_cfg, "dtype": expected_dtype}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (base_dir / name).is_file():
            assert (out / name).read_bytes() == (base_dir / name).read_bytes(), name
    if arch == "llama_untied":
        assert (out / "tokenizer.json").is_file()
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok("w1 w5 nope")["input_ids"] == [1, 5, 0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and sorted(index["weight_map"]) == sorted(got)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    card_text = (out / "README.md").read_text()
    card = front_matter(card_text)
    assert "base_model" not in card and card["tags"][:2] == ["model-surgery", "merge"]  # local inputs
    assert all(f"- `{p}` (local path, not on the Hub)" in card_text for p in [base_dir, *model_dirs])
    recipe = yaml.safe_load((out / "surgery_recipe.yaml").read_text())
    assert recipe["method"] == method and recipe["base"] == str(base_dir)
    assert not (out / ".surgery-partial").exists()


def test_reference_sort_is_stable_descending():
    """The reference's tie-breaking: equal |tau| keep ascending index order."""
    x = torch.tensor([1.0, -2.0, -1.0, 2.0, 0.0, 1.0])
    assert torch.sort(x.abs(), descending=True, stable=True).indices.tolist() == [1, 3, 0, 2, 5, 4]
    assert band_mask(x, 0.2, 0.5).tolist() == [True, False, True, True, False, False]


def test_single_model_scale_one_gives_that_model(families, invoke, tmp_path):
    """Task arithmetic with one fine-tune at scale 1 reproduces the (bfloat16) fine-tune exactly."""
    fam = families("llama_untied")
    out = tmp_path / "one"
    result = invoke("merge", fam["models"][0], "--base", fam["base"], "-o", out, "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    assert_same_bits(load_state(out), load_state(fam["models"][0]))
