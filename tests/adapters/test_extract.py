"""extract-lora: best rank-r factors (checked against an SVD computed here in float64), written as a
PEFT adapter that peft loads, merges and runs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel
from peft_factory import gpt2, llama, save_base
from safetensors.torch import load_file

LLAMA = transformers.LlamaForCausalLM
GPT2 = transformers.GPT2LMHeadModel


def fine_tune(model, seed: int = 3, low_rank: int | None = None, norms: bool = False):
    """Perturb every 2-D block weight (a low-rank update when ``low_rank``); norms too if asked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and (".layers." in name or ".h." in name):
                m, n = p.shape
                if low_rank:
                    p.add_(
                        0.1 * torch.randn(m, low_rank, generator=g) @ torch.randn(low_rank, n, generator=g)
                    )
                else:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            elif norms and p.ndim == 1:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = save_base(llama(), root / "base")
    ft = save_base(fine_tune(llama(), norms=True), root / "ft")
    return root, base, ft


def block_taus(base, ft, conv: bool = False) -> dict[str, torch.Tensor]:
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    out = {}
    for name in b:
        if b[name].ndim == 2 and (".layers." in name or ".h." in name):
            tau = f[name].double() - b[name].double()
            out[name] = tau.T if conv else tau  # peft's out x in
    return out


def best_rank(tau: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def peft_merged(cls, base, adapter):
    model = cls.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def test_full_rank_reconstructs_the_fine_tune(pair, invoke, tmp_path):
    root, base, ft = pair
    r = invoke(
        "extract-lora", base, ft, "--rank", 64, "-o", tmp_path / "lora", "-q", "--plot", tmp_path / "r.png"
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = peft_merged(LLAMA, base, tmp_path / "lora").state_dict()
    want = load_file(str(ft / "model.safetensors"))
    for name in block_taus(base, ft):
        torch.testing.assert_close(merged[name], want[name], rtol=0, atol=2e-6, msg=name)
    report = json.loads((tmp_path / "lora" / "surgery_lora.json").read_text())
    assert all(abs(m["energy_kept"] - 1) < 1e-6 for m in report["modules"])
    assert "model.norm.weight" in report["not_represented"]  # norms changed; a LoRA cannot carry them
    assert "not in the adapter (kept as the base): " in r.output


def test_rank_r_is_the_best_rank_r_approximation(pair, invoke, tmp_path):
    """B @ A = U_r S_r V_r^T of tau (computed here in float64), lora_B = U S^1/2, lora_A = S^1/2 V^T."""
    root, base, ft = pair
    r = invoke("extract-lora", base, ft, "--rank", 3, "-o", tmp_path / "lora", "--json", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    factors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    kept = {m["tensor"]: m for m in report["modules"]}
    for name, tau in block_taus(base, ft).items():
        stem = "base_model.model." + name.removesuffix(".weight")
        a, b = factors[stem + ".lora_A.weight"].double(), factors[stem + ".lora_B.weight"].double()
        assert a.shape[0] == b.shape[1] == 3
        torch.testing.assert_close(b @ a, best_rank(tau, 3), rtol=0, atol=1e-5, msg=name)
        # balanced factors: B^T B = A A^T = S_r
        torch.testing.assert_close(b.T @ b, a @ a.T, rtol=0, atol=1e-5)
        s = torch.linalg.svdvals(tau)
        assert kept[name]["energy_kept"] == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), abs=1e-6)
        assert kept[name]["frobenius_kept"] == pytest.approx(kept[name]["energy_kept"] ** 0.5, abs=1e-9)


def test_energy_picks_ranks_and_peft_logits_match(pair, invoke, tmp_path):
    """--energy: per module the smallest r keeping the energy (rank_pattern); peft's logits equal those
    of base + the rank-r approximations built here."""
    root, base, ft = pair
    r = invoke(
        "extract-lora", base, ft, "--energy", 0.6, "--max-rank", 6, "-o", tmp_path / "lora", "--json", "-q"
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ranks = {m["tensor"]: m["rank"] for m in report["modules"]}
    reference = LLAMA.from_pretrained(base, dtype=torch.float32)
    state = reference.state_dict()
    for name, tau in block_taus(base, ft).items():
        energy = torch.cumsum(torch.linalg.svdvals(tau) ** 2, 0)
        want = min(6, int(torch.searchsorted(energy, 0.6 * energy[-1])) + 1)
        assert ranks[name] == want, name
        state[name] = (state[name].double() + best_rank(tau, want)).float()
    assert len(set(ranks.values())) > 1  # the ranks really vary: rank_pattern is exercised
    reference.load_state_dict(state)
    model = PeftModel.from_pretrained(LLAMA.from_pretrained(base, dtype=torch.float32), tmp_path / "lora")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=2e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=0, atol=2e-5)


def test_randomized_svd_finds_the_low_rank_update(tmp_path, invoke):
    """A rank-2 fine-tune extracted at rank 2 with the randomized SVD: exact up to float32."""
    base = save_base(llama(), tmp_path / "base")
    ft = save_base(fine_tune(llama(), low_rank=2), tmp_path / "ft")
    r = invoke(
        "extract-lora", base, ft, "--rank", 2, "--svd", "randomized", "-o", tmp_path / "lora", "--json", "-q"
    )
    assert r.exit_code == 0, r.output
    assert all(m["energy_kept"] > 1 - 1e-5 for m in json.loads(r.stdout)["modules"])
    merged = peft_merged(LLAMA, base, tmp_path / "lora").state_dict()
    want = load_file(str(ft / "model.safetensors"))
    for name in block_taus(base, ft):
        torch.testing.assert_close(merged[name], want[name], rtol=0, atol=1e-5)


def test_gpt2_conv1d_and_modules_to_save(tmp_path, invoke):
    base = save_base(gpt2(), tmp_path / "base")
    ft_model = fine_tune(gpt2())
    with torch.no_grad():
        ft_model.transformer.wte.weight.add_(0.1)
    ft = save_base(ft_model, tmp_path / "ft")
    r = invoke("extract-lora", base, ft, "--rank", 4, "--include", r"wte", "-o", tmp_path / "lora", "-q")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["modules_to_save"] == ["transformer.wte"]
    merged = peft_merged(GPT2, base, tmp_path / "lora").state_dict()
    b = load_file(str(base / "model.safetensors"))
    for name, tau in block_taus(base, ft, conv=True).items():
        want = b[name].double() + best_rank(tau, 4).T
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-5, msg=name)
    assert torch.equal(
        merged["transformer.wte.weight"], load_file(str(ft / "model.safetensors"))["transformer.wte.weight"]
    )


def test_extracted_adapter_is_an_input(pair, invoke, tmp_path):
    """Round trip: the adapter surgery wrote reads (as an input) as peft merges it."""
    from surgery.inputs import open_input

    root, base, ft = pair
    assert invoke("extract-lora", base, ft, "--rank", 2, "-o", tmp_path / "lora", "-q").exit_code == 0
    merged = peft_merged(LLAMA, base, tmp_path / "lora").state_dict()
    with open_input(str(tmp_path / "lora")) as ckpt:  # base from base_model_name_or_path
        for name in block_taus(base, ft):
            got = torch.from_numpy(ckpt.read(name).copy())
            torch.testing.assert_close(got, merged[name], rtol=0, atol=1e-6)


def test_budget_too_small_names_the_matrix(pair, invoke, tmp_path):
    root, base, ft = pair
    r = invoke("extract-lora", base, ft, "--rank", 4, "--max-memory", "4KiB", "-o", tmp_path / "lora")
    assert r.exit_code == 1
    assert "error: matrix 'model.layers." in r.stderr and "GiB budget" in r.stderr
    assert "hint: raise --max-memory to at least" in r.stderr
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "choose the rank with exactly one of --rank R and --energy E"),
        (["--rank", 2, "--energy", 0.5], "choose the rank with exactly one of --rank R and --energy E"),
        (["--energy", 1.5], "--energy must be in (0, 1], got 1.5"),
        (["--rank", 0], "--rank must be at least 1, got 0"),
    ],
)
def test_bad_rank_options(pair, invoke, tmp_path, args, message):
    root, base, ft = pair
    r = invoke("extract-lora", base, ft, *args, "-o", tmp_path / "lora")
    assert r.exit_code == 1
    assert f"error: {message}" in r.stderr
    assert not (tmp_path / "lora").exists()


def test_merge_as_lora_equals_extracting_the_merge(tmp_path, invoke):
    """merge A1 A2 --base B --ties --as-lora --rank R == extract-lora B (merge A1 A2 --ties) --rank R,
    byte for byte; at full rank peft's merge of it gives the merged model (float32 rounding)."""
    from peft import LoraConfig
    from peft_factory import make_adapter, set_base_name

    base = save_base(llama(), tmp_path / "base")
    adapters = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "up_proj"])):
        a = make_adapter(
            llama(), tmp_path / f"a{i}", LoraConfig(r=2, lora_alpha=4, target_modules=targets), seed=i
        )
        set_base_name(a, str(base))
        adapters.append(a)
    r = invoke(
        "merge",
        *adapters,
        "--ties",
        "--density",
        "0.5",
        "--as-lora",
        "--rank",
        64,
        "-o",
        tmp_path / "lora",
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob(".lora.merged-*"))  # the scratch merge is gone
    r = invoke("merge", *adapters, "--ties", "--density", "0.5", "-o", tmp_path / "merged", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("extract-lora", base, tmp_path / "merged", "--rank", 64, "-o", tmp_path / "direct", "-q")
    assert r.exit_code == 0, r.output
    name = "adapter_model.safetensors"
    assert (tmp_path / "lora" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    merged = peft_merged(LLAMA, base, tmp_path / "lora").state_dict()
    want = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key in block_taus(base, tmp_path / "merged"):
        torch.testing.assert_close(merged[key], want[key], rtol=0, atol=2e-6, msg=key)


def test_rank_options_need_as_lora(pair, invoke, tmp_path):
    root, base, ft = pair
    r = invoke("merge", ft, "--base", base, "--rank", 4, "-o", tmp_path / "m")
    assert r.exit_code == 1 and "error: --rank does nothing without --as-lora" in r.stderr


def test_as_lora_refuses_a_full_output_before_merging(pair, invoke, tmp_path):
    root, base, ft = pair
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "mine.txt").write_text("keep me")
    r = invoke("merge", ft, "--base", base, "--as-lora", "--rank", 2, "-o", tmp_path / "lora")
    assert r.exit_code == 1 and f"error: output folder {tmp_path / 'lora'} is not empty" in r.stderr
    assert (tmp_path / "lora" / "mine.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".lora.merged-*"))


def test_overwrite_replaces_a_previous_extraction(pair, invoke, tmp_path):
    root, base, ft = pair
    assert invoke("extract-lora", base, ft, "--rank", 2, "-o", tmp_path / "lora", "-q").exit_code == 0
    r = invoke("extract-lora", base, ft, "--rank", 3, "-o", tmp_path / "lora", "-q")
    assert r.exit_code == 1 and "not empty" in r.stderr
    r = invoke("extract-lora", base, ft, "--rank", 3, "-o", tmp_path / "lora", "-q", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 3
