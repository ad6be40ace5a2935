"""TuCo (Nuti et al. 2025): the decomposition is exact, identical models give 0, steering at alpha=1
reproduces the fine-tuned model. Tiny Llama models are built from configs (no download)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from surgery.analysis.tuco import (  # noqa: E402
    components,
    decoder_layers,
    read_prompts,
    steered_generate,
    tuco,
    tuco_prompt,
)
from surgery.errors import InputNotFoundError, RecipeError  # noqa: E402

CHARS = "abcdefghij=+"


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(seed: int, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def finetune_of(base, scale: float = 0.05, seed: int = 1):
    import copy

    ft = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ft.eval()


@pytest.fixture(scope="module")
def pair():
    base = make_model(0)
    return base, finetune_of(base)


def test_decoder_layers_found_generically(pair):
    path, layers = decoder_layers(pair[1])
    assert path == "model.layers" and len(layers) == 3


def test_decomposition_is_exact(pair):
    pt, ft = pair
    ids = [1, 5, 6, 7, 8, 14]
    comp = components(pt, ft, ids)
    recon = comp["x0"] + (comp["ptc"] + comp["ftc"]).sum(0)
    # independent capture: the input of the final norm in a plain fine-tuned forward pass
    seen = {}

    def grab(module, args):
        seen["x"] = args[0][0].clone()

    handle = ft.model.norm.register_forward_pre_hook(grab)
    with torch.no_grad():
        ft(input_ids=torch.tensor([ids]), use_cache=False)
    handle.remove()
    torch.testing.assert_close(recon, seen["x"], rtol=1e-5, atol=1e-5)
    emb = ft.model.embed_tokens(torch.tensor(ids)).detach()
    torch.testing.assert_close(comp["x0"], emb)


def test_identical_models_give_zero(pair):
    pt = pair[0]
    res = tuco_prompt(pt, pt, [1, 5, 6, 7])
    assert res.tuco == 0.0
    assert max(res.ftc_norms) == 0.0 and res.sum_ptc_norm > 0


def test_tuco_in_range_and_grows_with_update(pair):
    pt, _ = pair
    small = tuco_prompt(pt, finetune_of(pt, 0.01), [1, 5, 6, 7]).tuco
    large = tuco_prompt(pt, finetune_of(pt, 0.2), [1, 5, 6, 7]).tuco
    assert 0 < small < large < 1


def test_report_with_tokenizer(pair):
    pt, ft = pair
    report = tuco(pt, ft, ["abc=", "ba+c="], tokenizer=make_tokenizer())
    assert len(report.prompts) == 2 and report.num_layers == 3
    assert len(report.mean_ftc_norms()) == 3
    json.dumps(report.to_dict())


def plain_greedy(model, ids, n):
    ids = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == 2:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_alpha_one_reproduces_finetuned(pair):
    pt, ft = pair
    tok = make_tokenizer()
    res = steered_generate(pt, ft, "abcd=", 1.0, max_new_tokens=10, tokenizer=tok)
    assert res["tokens"] == plain_greedy(ft, res["prompt_tokens"], 10)
    # alpha = 1 through the hooks (not the shortcut) agrees too
    res2 = steered_generate(pt, ft, "abcd=", 1.0 + 1e-12, max_new_tokens=10, tokenizer=tok)
    assert res2["tokens"] == res["tokens"]


def test_alpha_zero_uses_pretrained_blocks(pair):
    pt, ft = pair
    # with the same embeddings and head, alpha = 0 is the pre-trained model
    import copy

    ft2 = copy.deepcopy(pt)
    with torch.no_grad():
        for name, p in ft2.named_parameters():
            if ".layers." in name:
                p.add_(0.3 * torch.randn_like(p))
    tok = make_tokenizer()
    res = steered_generate(pt, ft2, "abcd=", 0.0, max_new_tokens=10, tokenizer=tok)
    assert res["tokens"] == plain_greedy(pt, res["prompt_tokens"], 10)


def test_alpha_invariant_for_identical_models(pair):
    pt = pair[0]
    tok = make_tokenizer()
    outs = {a: steered_generate(pt, pt, "abc=", a, 8, tok)["tokens"] for a in (0.0, 0.5, 1.0, 2.0)}
    assert len({tuple(v) for v in outs.values()}) == 1


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("abc=\n\nba=\n")
    assert read_prompts(tmp_path / "p.txt") == ["abc=", "ba="]
    (tmp_path / "p.jsonl").write_text('{"prompt": "abc=", "answer": "x"}\n{"prompt": "d="}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["abc=", "d="]
    (tmp_path / "bad.jsonl").write_text('{"text": "abc="}\n')
    with pytest.raises(RecipeError, match="bad.jsonl:1 has no string field 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(InputNotFoundError):
        read_prompts(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory, pair):
    root = tmp_path_factory.mktemp("tuco")
    tok = make_tokenizer()
    for name, model in zip(("base", "ft"), pair, strict=True):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "prompts.txt").write_text("abc=\nbad+c=\n")
    return root


def test_cli_tuco(saved_pair, tmp_path):
    from click.testing import CliRunner
    from surgery_cli.forward import tuco_command

    r = saved_pair
    res = CliRunner().invoke(tuco_command, [str(r / "base"), str(r / "ft"), "--prompts", str(r / "prompts.txt"),
                                            "--plot", str(tmp_path / "t.png")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mean TuCo" in res.output and (tmp_path / "t.png").stat().st_size > 0
    res = CliRunner().invoke(tuco_command, [str(r / "base"), str(r / "ft"), "--prompts", str(r / "prompts.txt"),
                                            "--json"])  # fmt: skip
    data = json.loads(res.stdout)
    assert len(data["prompts"]) == 2 and 0 < data["mean_tuco"] < 1


def test_cli_generate(saved_pair):
    from click.testing import CliRunner
    from surgery_cli.forward import generate_command

    r = saved_pair
    args = [str(r / "base"), str(r / "ft"), "--prompt", "abc=", "--max-new-tokens", "5", "--json"]
    res = CliRunner().invoke(generate_command, [*args, "--alpha", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    ft = transformers.AutoModelForCausalLM.from_pretrained(r / "ft", local_files_only=True).eval()
    assert data["tokens"] == plain_greedy(ft, data["prompt_tokens"], 5)
