"""`surgery tuco`, `surgery generate` and `surgery localize`: analyses that run the models forward.

Thin front ends over `surgery.analysis.tuco` and `surgery.analysis.localize`; torch, transformers and
matplotlib load inside the commands so that `surgery --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from surgery_cli.options import PLOT, THREADS, check_plot_path, make_parent, refuse_unused


def _threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@click.command("tuco")
@click.argument("base")
@click.argument("finetuned")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path),
              help="Text file (one prompt a line) or JSONL with a 'prompt' field.")  # fmt: skip
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=PLOT, default=None, callback=check_plot_path,
              help="PNG: TuCo per prompt and mean |FTC| per layer (its folder is created).")  # fmt: skip
@click.option("--threads", type=THREADS, default=None, help="CPU threads [default: all cores].")
def tuco_command(base: str, finetuned: str, prompts_file: Path, chat: bool, as_json: bool,
                 plot: Path | None, threads: int | None) -> None:  # fmt: skip
    """Tuning contribution of FINETUNED over BASE per prompt (Nuti et al., ICML 2025).

    TuCo = |sum_l FTC_l| / (|sum_l PTC_l| + |sum_l FTC_l|) at the last prompt token, where
    PTC_l = f_BASE(x_l) and FTC_l = f_FT(x_l) - f_BASE(x_l) on the fine-tuned residual stream.
    Holds both models in memory (about twice the model size in float32).

    \b
    surgery tuco BASE FT --prompts prompts.txt --plot tuco.png
    """
    from surgery.analysis.tuco import read_prompts, tuco

    _threads(threads)
    report = tuco(base, finetuned, read_prompts(prompts_file), chat=chat)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_tuco(report))
    if plot is not None:
        plot_tuco(report, plot)
        click.echo(f"wrote {plot}", err=as_json)


def render_tuco(report) -> str:
    width = min(40, max(len("prompt"), *(len(p.prompt) for p in report.prompts)))
    lines = [f"{'prompt':<{width}}  {'TuCo':>6}  {'|sum FTC|':>10}  {'|sum PTC|':>10}"]
    for p in report.prompts:
        text = p.prompt if len(p.prompt) <= width else p.prompt[: width - 3] + "..."
        lines.append(f"{text:<{width}}  {p.tuco:6.3f}  {p.sum_ftc_norm:10.4g}  {p.sum_ptc_norm:10.4g}")
    lines += ["", f"mean TuCo {report.mean_tuco:.4f} over {len(report.prompts)} prompts", "",
              f"{'layer':>5}  {'mean |FTC|':>10}  {'mean |PTC|':>10}"]  # fmt: skip
    n = len(report.prompts)
    for i, f in enumerate(report.mean_ftc_norms()):
        ptc = sum(p.ptc_norms[i] for p in report.prompts) / n
        lines.append(f"{i:>5}  {f:10.4g}  {ptc:10.4g}")
    return "\n".join(lines)


def plot_tuco(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(range(len(report.prompts)), [p.tuco for p in report.prompts])
    a.set(xlabel="prompt", ylabel="TuCo", title=f"TuCo per prompt (mean {report.mean_tuco:.3f})", ylim=(0, 1))
    b.plot(range(report.num_layers), report.mean_ftc_norms(), marker="o")
    b.set(xlabel="layer", ylabel="mean |FTC_l|", title="fine-tuning component per layer")
    fig.tight_layout()
    make_parent(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@click.command("generate")
@click.argument("base", required=False)
@click.argument("finetuned", required=False)
@click.option("--alpha", type=float, default=None,
              help="Steering: scale of the fine-tuning component (1 = FINETUNED, 0 = BASE blocks only). "
                   "EFT: scale of l_SF - l_SB [default: 1].")  # fmt: skip
@click.option("--eft", is_flag=True, help="Emulated fine-tuning: l_LB + alpha (l_SF - l_SB) per step.")
@click.option("--small-base", default=None, help="EFT: the small base model SB.")
@click.option("--small-finetuned", default=None, help="EFT: SB's fine-tune SF.")
@click.option("--large-base", default=None, help="EFT: the (larger) base LB, same tokenizer.")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens to generate at most (greedy).")  # fmt: skip
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--threads", type=THREADS, default=None, help="CPU threads [default: all cores].")
def generate_command(base: str | None, finetuned: str | None, alpha: float | None, eft: bool,
                     small_base: str | None, small_finetuned: str | None, large_base: str | None,
                     prompt: str, max_new_tokens: int, chat: bool, as_json: bool,
                     threads: int | None) -> None:  # fmt: skip
    """Greedy generation, steered by TuCo or by emulated fine-tuning (EFT).

    Steering (BASE FT --alpha A): x_{l+1} = x_l + PTC_l + A * FTC_l at every layer, no KV cache.
    EFT (Mitchell et al., ICLR 2024): logits = l_LB + A (l_SF - l_SB) at every step, with a KV
    cache per model; LB = SB reproduces SF.

    \b
    surgery generate BASE FT --alpha 0.5 --prompt "<sort>dcba="
    surgery generate --eft --small-base SB --small-finetuned SF --large-base LB --prompt "..."
    """
    from surgery.errors import RecipeError

    _threads(threads)
    eft_flags = [small_base, small_finetuned, large_base]
    if eft:
        if base or finetuned or None in eft_flags:
            raise RecipeError("--eft takes --small-base, --small-finetuned and --large-base (no BASE FT)",
                              hint="surgery generate --eft --small-base SB --small-finetuned SF "
                                   "--large-base LB --prompt TEXT")  # fmt: skip
        from surgery.analysis.eft import eft_generate

        a = 1.0 if alpha is None else alpha
        result = eft_generate(*eft_flags, prompt, a, max_new_tokens, chat=chat)
    else:
        if any(eft_flags):
            raise RecipeError("--small-base, --small-finetuned and --large-base need --eft")
        if not (base and finetuned and alpha is not None):
            raise RecipeError("steering needs BASE, FINETUNED and --alpha", hint="or use --eft")
        from surgery.analysis.tuco import steered_generate

        result = steered_generate(base, finetuned, prompt, alpha, max_new_tokens, chat=chat)
    click.echo(json.dumps(result) if as_json else result["text"])


@click.command("localize")
@click.argument("base")
@click.argument("finetuned")
@click.option("--data", "data_file", type=click.Path(path_type=Path), default=None,
              help='JSONL rows {"prompt": ..., "answer": ...}.')  # fmt: skip
@click.option("--density", type=float, default=None, help="Fraction of the region's parameters grafted.")
@click.option("--region", default=None, help="Regex of tensors to graft [default: the transformer blocks].")
@click.option("--steps", type=int, default=100, show_default=True, help="Gradient steps on the mask.")
@click.option("--lr", type=float, default=1.0, show_default=True,
              help="Step size, in units of the data-free count's largest |grad| (scale-free).")  # fmt: skip
@click.option("--allow-growth", is_flag=True,
              help="The paper's rounded mask: the patch may hold more than --density [default: exactly "
                   "the data-free count].")  # fmt: skip
@click.option("--holdout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True,
              help="Fraction of --data held out (never trained on) to report accuracy on.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mask init and the split.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Patch folder.")
@click.option("--overwrite", is_flag=True, help="Replace a previous surgery output (never other files).")
@click.option("--compare", "compare", type=click.Path(path_type=Path), default=None,
              help="Jaccard overlap of this patch with another (FINETUNED may be a patch then).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--threads", type=THREADS, default=None, help="CPU threads [default: all cores].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def localize_command(ctx: click.Context, base: str, finetuned: str, data_file: Path | None,
                     density: float | None, region: str | None, steps: int, lr: float,
                     allow_growth: bool, holdout: float, seed: int,
                     output: Path | None, overwrite: bool, compare: Path | None, as_json: bool,
                     threads: int | None, quiet: bool) -> None:  # fmt: skip
    """Optimised skill graft (Panigrahi et al., ICML 2023) written as a sparse patch.

    Starts from the data-free top-DENSITY mask of |FINETUNED - BASE| over the region and learns
    gamma = m0 + (1 - 2 m0) sigmoid(S - 10) on the task loss of --data; keeps the rounded mask with
    the best score. `surgery apply PATCH --to BASE -o OUT` applies it.

    \b
    surgery localize BASE FT --data sort.jsonl --density 0.01 -o sort.patch
    surgery localize BASE PATCH_A --compare PATCH_B        # Jaccard overlap of two patches
    """
    from surgery.errors import RecipeError

    if compare is not None:
        from surgery.analysis.localize import compare_patches

        refuse_unused(ctx, ("data_file", "density", "region", "steps", "lr", "allow_growth", "holdout",
                            "seed", "output", "overwrite", "threads"), "with --compare",
                      hint="--compare only reads two patches")  # fmt: skip

        report = compare_patches(finetuned, compare)
        click.echo(json.dumps(report, indent=2) if as_json else render_compare(report))
        return
    if data_file is None or density is None or output is None:
        raise RecipeError("localize needs --data, --density and -o", hint="or --compare PATCH2")
    from surgery_cli.analysis import _Bar

    from surgery.analysis.localize import localize, read_examples

    _threads(threads)
    with _Bar("localize", "step", quiet) as bar:
        report = localize(base, finetuned, read_examples(data_file), density, output, region=region,
                          steps=steps, lr=lr, fixed_density=not allow_growth, seed=seed,
                          overwrite=overwrite, progress=bar.update, holdout=holdout)  # fmt: skip
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else render_localize(report))


def render_localize(report) -> str:
    rows = [("base", 0.0, report.scores["base"]), ("fine-tune", 1.0, report.scores["finetuned"]),
            ("data-free graft", report.data_free_fraction, report.scores["data_free"]),
            ("optimised graft", report.fraction, report.scores["optimised"])]  # fmt: skip
    where = f"{len(report.held_out)} held-out examples" if report.held_out else "the training data"
    lines = [f"scores on {where}", f"{'model':<16}  {'params':>10}  {'accuracy':>8}  {'loss':>8}"]
    for name, frac, s in rows:
        lines.append(f"{name:<16}  {100 * frac:9.4g}%  {100 * s['accuracy']:7.1f}%  {s['loss']:8.4f}")
    lines.append(f"wrote {report.output}: {report.kept:,} of {report.total:,} region parameters")
    return "\n".join(lines)


def render_compare(report: dict) -> str:
    lines = [f"{'tensor':<48}  {'|A|':>8}  {'|B|':>8}  {'|A&B|':>8}  {'Jaccard':>7}"]
    for name, t in report["tensors"].items():
        lines.append(f"{name:<48}  {t['a']:>8}  {t['b']:>8}  {t['both']:>8}  {t['jaccard']:7.4f}")
    o = report["overall"]
    lines.append(f"{'overall':<48}  {o['a']:>8}  {o['b']:>8}  {o['both']:>8}  {o['jaccard']:7.4f}")
    return "\n".join(lines)
