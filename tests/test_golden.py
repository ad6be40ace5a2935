"""Golden output bytes: every method x dtype x granularity, recorded before the engine redesign.

Each case runs the ``surgery`` command in-process on seeded fixtures (``ckpt_factory.make_family``
in F32 / F16 / BF16, a vocabulary-shifted trio for transfer, and the bundled example family) and
records the SHA-256 of every file it writes: weight shards, the index, config.json, side files,
``surgery_recipe.yaml``, ``surgery_diff.json`` and the model card ``README.md``. Recipes, manifests and
cards name the inputs by absolute path, so the fixture folder's path is replaced by ``<ROOT>`` (and
the example family's by ``<FAMILY>``) before hashing; with that, every file is deterministic (the
card has no version or date in it), so README.md is hashed too.

A refactor that changes one output byte fails here and names the case and the file. To record a new
golden file after an intended change of output bytes (bump ``engine.ENGINE_VERSION`` then)::

    SURGERY_GOLDEN_REGEN=1 python -m pytest -q tests/test_golden.py

``tests/golden/recipes/`` holds recipes written by the code before the redesign (inputs as
``<ROOT>/...``); they must still run and give the recorded bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from ckpt_factory import make_family
from safetensors.torch import save_file

GOLDEN = Path(__file__).parent / "golden"
HASHES = GOLDEN / "hashes.json"
RECIPES = GOLDEN / "recipes"
FAMILY = Path(__file__).resolve().parents[1] / "examples" / "family"
REGEN = os.environ.get("SURGERY_GOLDEN_REGEN") == "1"
DTYPES = ("F32", "F16", "BF16")
GRANULARITIES = ("per_tensor", "per_row", "global")

# (case id, surgery arguments); {base} {ft1} {ft2} {ft3} are the dtype family's folders, {out} the output.
MERGES = [("task_arithmetic", ["merge", "{ft1}", "{ft2}", "--base", "{base}"]),
          ("task_arithmetic_w_scale", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--weights", "0.7,0.4",
                                       "--scale", "0.8"]),
          ("task_arithmetic_to_f16_sharded", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--dtype", "float16",
                                              "--max-shard-size", "3000"]),
          ("dare", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--dare", "--density", "0.6", "--seed", "3"]),
          ("dare_ties", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--dare-ties", "--density", "0.7"]),
          ("linear", ["merge", "{ft1}", "{ft2}", "--linear", "--weights", "1,3"]),
          ("linear_with_base", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--linear"]),
          ("slerp_models", ["merge", "{ft1}", "{ft2}", "--slerp", "--t", "0.3"]),
          ("slerp_base", ["merge", "{ft1}", "--base", "{base}", "--slerp"]),
          ("model_stock", ["merge", "{ft1}", "{ft2}", "{ft3}", "--base", "{base}", "--model-stock"]),
          ("lines_auto_ties", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--ties", "--lines"]),
          ("lines_fixed_outside_one", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--lines", "--lines-alpha",
                                       "0.4", "--lines-beta", "0.5", "--lines-outside", "one"]),
          ("lines_slerp", ["merge", "{ft1}", "--base", "{base}", "--slerp", "--lines", "--lines-alpha", "0.5"]),
          ("lines_edit", ["lines", "{base}", "{ft1}", "--alpha", "0.3", "--lines-outside", "alpha+beta"]),
          ("diff", ["diff", "{base}", "{ft1}"]),
          ("diff_patch_density", ["diff", "{base}", "{ft1}", "--density", "0.25"]),
          ("diff_patch_breadcrumbs", ["diff", "{base}", "{ft1}", "--breadcrumbs", "--density", "0.3",
                                      "--outliers", "0.05", "--region", "layers"]),
          ("diff_graft_patch", ["diff", "{base}", "{ft1}", "--graft", "0.1"]),
          ("graft", ["graft", "{base}", "{ft1}", "--density", "0.05"]),
          ("graft_patch_region", ["graft", "{base}", "{ft1}", "--density", "0.2", "--region", "mlp", "--patch"]),
          ("transfer", ["transfer", "--from", "{base}", "--finetuned", "{ft1}", "--to", "{ft2}", "--scale", "0.9"]),
          # added after the redesign, with the methods of the second wave that need no SVD (LAPACK results
          # may differ across machines): their bytes are pinned from here on
          ("nearswap", ["merge", "{ft1}", "--base", "{base}", "--nearswap", "--distance", "0.01"]),
          ("nuslerp_base", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--nuslerp", "--weights", "1,2"]),
          ("multislerp", ["merge", "{ft1}", "{ft2}", "{ft3}", "--base", "{base}", "--multislerp"]),
          ("karcher", ["merge", "{ft1}", "{ft2}", "--karcher"]),
          ("sce", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--sce", "--density", "0.5"]),
          ("ties_gradient_filter", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--ties", "--density", "0.3:0.8",
                                    "--filter", "mlp:density=0.5"]),
          ("reset_matrix", ["reset", "{base}", "{ft1}", "--fraction", "0.5", "--seed", "1"]),
          ("reset_element_smallest", ["reset", "{base}", "{ft1}", "--fraction", "0.5", "--by", "element",
                                      "--select", "smallest-update"]),
          ("della", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--della", "--density", "0.6", "--epsilon",
                     "0.2", "--seed", "3"]),
          ("della_linear_l1", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--della-linear", "--rescale", "l1"]),
          ("ties_rescale_l1", ["merge", "{ft1}", "{ft2}", "--base", "{base}", "--ties", "--density", "0.3",
                               "--rescale", "l1"]),
          ]  # fmt: skip
for _method in ("breadcrumbs", "breadcrumbs_ties", "ties"):
    for _g in GRANULARITIES:
        MERGES.append((f"{_method}_{_g}", ["merge", "{ft1}", "{ft2}", "--base", "{base}",
                                           "--" + _method.replace("_", "-"), "--granularity", _g]))  # fmt: skip
# Cases that read another case's output (run after it): apply a dense diff and a sparse patch.
APPLIES = [("apply_diff", "diff", ["apply", "{prev}", "--to", "{ft2}", "--scale", "0.5"]),
           ("apply_patch", "diff_patch_density", ["apply", "{prev}", "--to", "{base}"]),
           ("apply_graft_patch", "graft_patch_region", ["apply", "{prev}", "--to", "{base}", "--scale", "2"])]  # fmt: skip

FAMILY_CASES = [
    ("family_task_arithmetic", ["merge", "{F}/ft_add", "{F}/ft_reverse", "{F}/ft_sort", "--task-arithmetic"]),
    ("family_breadcrumbs", ["merge", "{F}/ft_add", "{F}/ft_reverse", "{F}/ft_sort", "--breadcrumbs"]),
    ("family_ties_global", ["merge", "{F}/ft_add", "{F}/ft_sort", "--ties", "--granularity", "global"]),
    ("family_lines_auto", ["merge", "{F}/ft_add", "{F}/ft_reverse", "--lines"]),
    (
        "family_transfer",
        ["transfer", "--from", "{F}/base", "--finetuned", "{F}/ft_sort", "--to", "{F}/base_v2"],
    ),
    ("family_graft_patch", ["graft", "{F}/base", "{F}/ft_add", "--density", "0.01", "--patch"]),
]


def write_vocab_model(folder: Path, tokens: list[str], rows: dict, extra: torch.Tensor) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder.mkdir(parents=True)
    Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(
        str(folder / "tokenizer.json")
    )
    emb = torch.stack([rows[t] for t in tokens]).to(torch.bfloat16)
    tensors = {"model.embed_tokens.weight": emb, "model.layers.0.w": extra.to(torch.bfloat16)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(tokens), "num_hidden_layers": 1}))


def vocab_trio(root: Path) -> None:
    """old base, its fine-tune with one added token, a new base with reshuffled ids and a new token."""
    g = torch.Generator().manual_seed(0)
    vocab = [f"tok{i}" for i in range(12)]
    w = torch.randn(3, 3, generator=g)
    old = {t: torch.randn(4, generator=g) for t in vocab}
    ft = {t: v + 0.1 * torch.randn(4, generator=g) for t, v in old.items()}
    ft["<chat>"] = torch.randn(4, generator=g)
    new = {t: v + 0.01 * torch.randn(4, generator=g) for t, v in old.items()}
    new["newtok"] = torch.randn(4, generator=g)
    write_vocab_model(root / "old", vocab, old, w)
    write_vocab_model(root / "ft", vocab + ["<chat>"], ft, w + 0.5)
    write_vocab_model(root / "new", list(reversed(vocab)) + ["newtok"], new, w - 0.5)


def folder_hashes(out: Path, subs: dict[str, str]) -> dict[str, str]:
    """SHA-256 of every file in ``out`` (recursively), absolute input paths replaced by placeholders."""
    hashes = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if not path.name.endswith(".safetensors"):
            for real, placeholder in subs.items():
                data = data.replace(real.encode(), placeholder.encode())
        hashes[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return hashes


def surgery(*args: str) -> None:
    from click.testing import CliRunner
    from surgery_cli.main import cli

    result = CliRunner().invoke(cli, [*args, "-q", "--threads", "2"])
    assert result.exit_code == 0, (args, result.output)


def fill(args: list[str], paths: dict[str, Path | str]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, str]]:
    """case id -> {file: sha256} for every case."""
    root = tmp_path_factory.mktemp("golden")
    subs = {str(root): "<ROOT>", str(FAMILY): "<FAMILY>"}
    found: dict[str, dict[str, str]] = {}
    for dtype in DTYPES:
        base, fts = make_family(root / dtype, n_models=3, dtype=dtype, quantize=dtype == "F32")
        paths = {"base": base, "ft1": fts[0], "ft2": fts[1], "ft3": fts[2]}
        for case, args in MERGES:
            out = root / "out" / dtype / case
            surgery(*fill(args, paths), "-o", str(out))
            found[f"{dtype}/{case}"] = folder_hashes(out, subs)
        for case, prev, args in APPLIES:
            out = root / "out" / dtype / case
            surgery(*fill(args, paths | {"prev": root / "out" / dtype / prev}), "-o", str(out))
            found[f"{dtype}/{case}"] = folder_hashes(out, subs)
    vocab_trio(root / "vocab")
    for case, extra in (
        ("transfer_vocab", []),
        ("transfer_vocab_new_base", ["--tokenizer-from", "new-base"]),
    ):
        out = root / "out" / case
        v = root / "vocab"
        surgery("transfer", "--from", str(v / "old"), "--finetuned", str(v / "ft"), "--to", str(v / "new"),
                *extra, "-o", str(out))  # fmt: skip
        found[case] = folder_hashes(out, subs)
    for case, args in FAMILY_CASES:
        out = root / "out" / case
        surgery(*fill(args, {"F": FAMILY}), "-o", str(out))
        found[case] = folder_hashes(out, subs)
    found["_root"] = {"path": str(root)}
    return found


def test_every_output_byte_matches_the_golden_file(runs):
    got = {k: v for k, v in runs.items() if k != "_root"}
    if REGEN:
        HASHES.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(HASHES.read_text())
    assert sorted(got) == sorted(want), "golden cases differ: regenerate only for an intended change"
    differ = [
        f"{case}/{name}"
        for case in sorted(want)
        for name in sorted(set(want[case]) | set(got[case]))
        if want[case].get(name) != got[case].get(name)
    ]
    assert not differ, f"{len(differ)} output files changed, e.g. {differ[:8]}"


RECIPE_CASES = [
    "F32/breadcrumbs_global",
    "BF16/dare_ties",
    "F16/lines_auto_ties",
    "BF16/diff_patch_breadcrumbs",
]


def test_recipes_written_before_the_redesign_still_run(runs, tmp_path):
    """Recipes saved by the old code (paths as <ROOT>) run via `surgery run` and give the same bytes."""
    root = runs["_root"]["path"]
    if REGEN:
        RECIPES.mkdir(parents=True, exist_ok=True)
        for case in RECIPE_CASES:
            text = (Path(root) / "out" / case / "surgery_recipe.yaml").read_text().replace(root, "<ROOT>")
            (RECIPES / (case.replace("/", "__") + ".yaml")).write_text(text)
    for case in RECIPE_CASES:
        recipe = tmp_path / (case.replace("/", "__") + ".yaml")
        recipe.write_text((RECIPES / recipe.name).read_text().replace("<ROOT>", root))
        out = tmp_path / case.replace("/", "__")
        surgery("run", str(recipe), "-o", str(out))
        got = folder_hashes(out, {root: "<ROOT>"})
        assert got == runs[case], case


def test_the_library_writes_the_same_folder_as_the_cli(runs, tmp_path):
    """``surgery.merge(make_recipe(...))`` from Python: every file, card included, as the command's."""
    import surgery

    root = Path(runs["_root"]["path"])
    cases = {
        "F32/lines_auto_ties": ("ties", ["ft1", "ft2"], {}, {"alpha": "auto"}, None),
        "BF16/diff_patch_density": ("patch", ["ft1"], {"density": 0.25, "region": "."}, None, None),
        "F16/task_arithmetic_to_f16_sharded": ("task_arithmetic", ["ft1", "ft2"], {}, None, "float16"),
    }
    for case, (method, models, params, lines, dtype) in cases.items():
        d = root / case.split("/")[0]
        recipe = surgery.make_recipe(method, [d / m for m in models], d / "base", params, dtype,
                                     3000 if "sharded" in case else "5GB", lines)  # fmt: skip
        out = tmp_path / case.replace("/", "__")
        surgery.merge(recipe, out, surgery.EngineOptions(threads=2))
        assert folder_hashes(out, {str(root): "<ROOT>"}) == runs[case], case
