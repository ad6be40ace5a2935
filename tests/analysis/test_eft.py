"""EFT (Mitchell et al., ICLR 2024): logits = l_LB + alpha (l_SF - l_SB) per step. LB == SB reproduces
SF token for token, the KV-cached decoding equals the uncached one, and the combination is the formula
computed independently here; mismatched tokenizers are refused."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from surgery.analysis.eft import eft_generate  # noqa: E402
from surgery.errors import IncompatibleTensorsError, RecipeError  # noqa: E402
from tests.analysis.test_tuco import finetune_of, make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def trio():
    sb = make_model(0)
    sf = finetune_of(sb, scale=0.3, seed=1)
    lb = make_model(7, layers=4)  # a different (deeper) base with the same tokenizer
    return sb, sf, lb


def greedy(model, ids, n, cache=True):
    """SF's own greedy decoding (the reference), with or without its KV cache."""
    out, past, feed, seq = [], None, torch.tensor([ids]), torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            if cache:
                res = model(input_ids=feed, cache=past, use_cache=True)
                past = res.cache
            else:
                res = model(input_ids=seq, use_cache=False)
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if nxt == 2:
                break
            feed = torch.tensor([[nxt]])
            seq = torch.cat([seq, feed], 1)
    return out


def eft_reference(sb, sf, lb, ids, alpha, n):
    """l_LB + alpha (l_SF - l_SB) from full recomputation of each model (float64 sum)."""
    seq, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            ls = [m(input_ids=seq, use_cache=False).logits[0, -1].double() for m in (sb, sf, lb)]
            nxt = int((ls[2] + alpha * (ls[1] - ls[0])).argmax())
            out.append(nxt)
            if nxt == 2:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    return out


def test_large_equal_small_base_reproduces_the_finetune(trio):
    sb, sf, _ = trio
    tok = make_tokenizer()
    for prompt in ("abcd=", "ba+c="):
        res = eft_generate(sb, sf, sb, prompt, 1.0, 10, tokenizer=tok)
        assert res["tokens"] == greedy(sf, res["prompt_tokens"], 10)
        assert res["tokens"] == greedy(sf, res["prompt_tokens"], 10, cache=False)
        assert res["prompt_tokens"] == tok(prompt)["input_ids"]


def test_alpha_zero_is_the_large_base(trio):
    sb, sf, lb = trio
    tok = make_tokenizer()
    res = eft_generate(sb, sf, lb, "abc=", 0.0, 10, tokenizer=tok)
    assert res["tokens"] == greedy(lb, res["prompt_tokens"], 10)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_cached_equals_uncached_and_formula(trio, alpha):
    sb, sf, lb = trio
    tok = make_tokenizer()
    cached = eft_generate(sb, sf, lb, "abcd=", alpha, 10, tokenizer=tok)
    uncached = eft_generate(sb, sf, lb, "abcd=", alpha, 10, tokenizer=tok, use_cache=False)
    assert cached["tokens"] == uncached["tokens"]
    assert cached["tokens"] == eft_reference(sb, sf, lb, cached["prompt_tokens"], alpha, 10)
    assert len(cached["tokens"]) == 10 or cached["tokens"][-1] == 2  # stops only at the end token


@pytest.fixture(scope="module")
def saved_trio(tmp_path_factory, trio):
    root = tmp_path_factory.mktemp("eft")
    tok = make_tokenizer()
    for name, model in zip(("sb", "sf", "lb"), trio, strict=True):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    # a fourth model whose tokenizer maps two characters to swapped ids
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *"bacdefghij=+"])}
    other = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    trio[2].save_pretrained(root / "lb_other")
    PreTrainedTokenizerFast(tokenizer_object=other, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(root / "lb_other")  # fmt: skip
    return root


def test_cli_eft_json_and_identity(saved_trio):
    from click.testing import CliRunner
    from surgery_cli.main import cli

    r = saved_trio
    args = ["generate", "--eft", "--small-base", str(r / "sb"), "--small-finetuned", str(r / "sf"),
            "--prompt", "abc=", "--max-new-tokens", "6", "--json"]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--large-base", str(r / "sb")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    sf = transformers.AutoModelForCausalLM.from_pretrained(r / "sf", local_files_only=True).eval()
    assert data["tokens"] == greedy(sf, data["prompt_tokens"], 6)
    assert isinstance(data["text"], str)
    res = CliRunner().invoke(cli, [*args, "--large-base", str(r / "lb"), "--alpha", "0.5"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)) == {"tokens", "text", "prompt_tokens"}


def test_mismatched_tokenizer_is_refused(saved_trio):
    from click.testing import CliRunner
    from surgery_cli.main import cli

    r = saved_trio
    args = ["generate", "--eft", "--small-base", str(r / "sb"), "--small-finetuned", str(r / "sf"),
            "--large-base", str(r / "lb_other"), "--prompt", "abc="]  # fmt: skip
    with pytest.raises(IncompatibleTensorsError, match="does not share the tokenizer of"):
        eft_generate(r / "sb", r / "sf", r / "lb_other", "abc=")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1
    assert "error: " in res.output and "does not share the tokenizer" in res.output
    assert "hint: EFT adds logits token by token" in res.output


def test_cli_flag_errors(saved_trio):
    from click.testing import CliRunner
    from surgery_cli.main import cli

    r = saved_trio
    res = CliRunner().invoke(cli, ["generate", "--eft", "--small-base", str(r / "sb"), "--prompt", "a"])
    assert res.exit_code == 1 and "error: --eft takes --small-base" in res.output
    res = CliRunner().invoke(cli, ["generate", str(r / "sb"), str(r / "sf"), "--prompt", "a"])
    assert res.exit_code == 1 and "error: steering needs BASE, FINETUNED and --alpha" in res.output
    with pytest.raises(RecipeError, match="as paths or all three"):
        eft_generate(r / "sb", torch.nn.Linear(1, 1), r / "sb", "a")
