"""Planning: a recipe becomes a list of tensor jobs, checked completely before any weight is read.

Every problem found in the headers (missing or extra tensors, shape, dtype or vocabulary mismatches)
is collected and reported at once, so a user fixes them in one go rather than one per run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from surgery.adapters import AdapterCheckpoint
from surgery.checkpoint import Checkpoint
from surgery.compose import DENSE, base_conflicts, touched
from surgery.dtypes import DTYPES
from surgery.errors import PlanError, RecipeError
from surgery.files import CONFIG
from surgery.inputs import InputOptions, open_input
from surgery.layer_slices import extra_inputs, layer_count_updates, slice_picks
from surgery.methods.lines import depths
from surgery.methods.spec import TAU_GIVEN, TAU_PAIRS
from surgery.names import layer_map, natural_key, place, with_block
from surgery.output import side_files_of
from surgery.patch import read_manifest
from surgery.recipe import Recipe
from surgery.vocab import RowMap, align_rows, load_vocab
from surgery.vocab_union import align_vocabularies
from surgery.writer import Layout, OutputTensor, plan_layout

_VOCAB_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "shared.weight", "output.weight")


# What a job writes (the engine runs one writer function per kind):
#   copy_equal  an integer tensor, equal in every input, copied
#   copy_base   copied from input ``copy_from`` (F8, a tensor a diff does not hold, layer stacking);
#               a float tensor times its ``scale`` parameter when the job has one (passthrough scale)
#   keep_base   a float tensor outside the method's region: input 0 in the output dtype
#   dense       the method's output: b + update, or an interpolation of the inputs
#   update      the merged update alone (a diff)
#   patch       the selected entries of the update as (indices, values) tensors
#   scatter     input 0 plus sparse patches (or dense diffs: inputs 1, 2, ...) at their indices
#   pick        each element from input 0 or input 1, bit for bit (the method's ``Pick`` rules)
JobKind = Literal["copy_equal", "copy_base", "keep_base", "dense", "update", "patch", "scatter", "pick"]
MERGED = frozenset({"dense", "update", "patch", "scatter", "pick"})  # kinds the method computes


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: what to write (``kind``), from which input tensors, with which parameters.

    ``params`` are the method's parameters for this tensor, resolved by the planner (the recipe's,
    shared by every job unless a per-tensor rule changes them): the engine reads parameters only from
    the job. ``sources`` names the tensor read from each input (default: the output's own name), so an
    output tensor can come from a differently named input tensor (layer slices, stacking).
    """

    name: str
    kind: JobKind
    shape: tuple[int, ...]
    in_dtypes: tuple[str, ...]  # per input, engine order
    out_dtype: str
    depth: float | None = None  # LiNeS: l / (L - 1) of the tensor's block; None outside the blocks
    row_map: RowMap | None = None  # transfer across vocabularies: output rows by token string
    # scatter: per patch (or dense diff) after the target, this tensor's entries in it
    # (0: untouched, compose.DENSE: a dense diff holds the whole tensor)
    patch_counts: tuple[int, ...] = ()
    params: Mapping[str, object] = field(default_factory=dict, compare=False)
    sources: tuple[str, ...] | None = None  # input tensor name per input; None: ``name`` everywhere
    inputs: tuple[int, ...] | None = None  # the plan inputs read, engine order; None: the recipe's
    copy_from: int = 0  # copy_base: the input copied (layer stacking copies from any model)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def cols(self) -> int:
        """Row length (the last dimension; 1 for a scalar)."""
        return self.shape[-1] if self.shape else 1

    def source(self, i: int) -> str:
        """The tensor read from input ``i``."""
        return self.name if self.sources is None else self.sources[i]


@dataclass(frozen=True)
class Plan:
    """A checked recipe: the opened inputs, one job per output tensor, the output layout. Frozen: a
    run reads it and returns what it settled (``engine.RunResult``), never writes into it."""

    recipe: Recipe
    inputs: list[Checkpoint]  # engine order: base first when the recipe has one
    jobs: list[TensorJob]
    layout: Layout | None  # None for sparse patches: sizes are known after the reduce passes
    config_source: Checkpoint
    notes: list[str] = field(default_factory=list)
    tokenizer_source: Checkpoint | None = None  # tokenizer / chat template / generation config
    config_updates: Mapping[str, object] = field(default_factory=dict)  # config.json keys set (layer count)
    tokenizer_files: Mapping[str, bytes | None] = field(default_factory=dict)  # written (None: left out)

    @property
    def has_base(self) -> bool:
        return self.recipe.base is not None

    def inputs_of(self, job: TensorJob) -> list[Checkpoint]:
        """The inputs a job reads, in engine order (layer slices may merge other models)."""
        return self.inputs if job.inputs is None else [self.inputs[i] for i in job.inputs]

    def close(self) -> None:
        for ckpt in self.inputs:
            ckpt.close()

    def output_config(self) -> dict | None:
        """The config source's config.json with its dtype set to the output's float dtype."""
        config = self.config_source.config()
        if config is None:
            return None
        config.update(self.config_updates)
        aligned = [j.row_map for j in self.jobs if j.row_map is not None]
        if aligned and "vocab_size" in config:
            config["vocab_size"] = aligned[0].n_out
        floats = {j.out_dtype for j in self.jobs if DTYPES[j.out_dtype].kind == "float"}
        if len(floats) == 1:
            torch_name = DTYPES[floats.pop()].torch_name
            config["dtype"] = torch_name
            if "torch_dtype" in config:
                config["torch_dtype"] = torch_name
        return config

    @property
    def merge_jobs(self) -> list[TensorJob]:
        """Jobs the method computes (selected float tensors)."""
        return [j for j in self.jobs if j.kind in MERGED]

    def side_files(self) -> dict[str, bytes]:
        files = {}
        sources = [self.config_source]
        if self.tokenizer_source is not None and self.tokenizer_source is not self.config_source:
            sources.append(self.tokenizer_source)
        for source in sources:  # the tokenizer source, listed last, wins
            files.update(side_files_of(source.root, config=False))
        for name, data in self.tokenizer_files.items():  # an edited tokenizer replaces the copied one
            if data is None:
                files.pop(name, None)
            else:
                files[name] = data
        config = self.output_config()
        if config is not None:
            files[CONFIG] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        return files

    def summary(self, max_memory: int = 2 * 2**30, workers: int = 1) -> dict:
        """Facts for --dry-run: sizes, counts, passes, and a time estimate for this machine class."""
        read = sum(c.total_bytes for c in self.inputs)
        write = self.layout.total_bytes if self.layout is not None else 0
        spec = self.recipe.spec
        passes = spec.passes(self.recipe.parameters)
        if self.recipe.lines is not None and self.recipe.lines.alpha == "auto":
            passes += 1  # the LiNeS auto-alpha measure pass
        chunks = estimated_chunks(self.jobs, len(self.inputs), max_memory, workers)
        return {
            "method": spec.name,
            "inputs": [c.source for c in self.inputs],
            "tensors": len(self.jobs),
            "merged_tensors": len(self.merge_jobs),
            "copied_tensors": len(self.jobs) - len(self.merge_jobs),
            "read_bytes": read,
            "output_bytes": write,
            "shards": [s.filename for s in self.layout.shards] if self.layout else "decided after ranking",
            "passes_over_inputs": passes,
            "chunks": chunks,
            "estimated_seconds": estimate_seconds(read, write, passes, chunks, workers),
            "notes": list(self.notes),
        }


# Measured on the 2-core VM of NOTES.md: cold reads ~1 GB/s, reads from the page cache ~3 GB/s,
# writes with fsync ~0.3 GB/s, ~40 us of fixed cost per chunk and pass (a 2 MB merge took 23 s at
# --max-memory 0, i.e. one-element chunks, and 1.2 s at 64KiB), ~1 s to start (imports, kernels).
COLD_READ, WARM_READ, WRITE, PER_CHUNK, START = 1.0e9, 3.0e9, 0.3e9, 40e-6, 1.0


def estimated_chunks(jobs: list[TensorJob], n_inputs: int, max_memory: int, workers: int) -> int:
    """How many chunks a pass makes: each worker's share of the budget over ~the bytes an element
    needs (inputs decoded to float32, task vectors, output); the engine sizes chunks the same way."""
    share = max(1, max_memory // max(1, workers))
    per = 4 * n_inputs + 4 * max(1, n_inputs - 1) + 8
    chunk = max(1, share // per)
    return sum(-(-max(1, j.numel) // chunk) for j in jobs)


def estimate_seconds(read: int, write: int, passes: int, chunks: int, workers: int) -> float:
    """The first pass reads cold, later passes from the page cache when the inputs fit in half of
    the memory (else cold again); the output is written once; chunk overhead is shared by workers."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        memory = 0
    later = WARM_READ if read <= memory / 2 else COLD_READ
    seconds = START + read / COLD_READ + (passes - 1) * read / later + write / WRITE
    seconds += passes * chunks * PER_CHUNK / max(1, min(workers, os.cpu_count() or 1))
    return round(seconds, 4)


def input_passes(recipe: Recipe) -> int:
    """How many times a run reads each input tensor (at most: a tensor that fits one chunk is read once)."""
    passes = recipe.spec.passes(recipe.parameters)
    if recipe.lines is not None and recipe.lines.alpha == "auto":
        passes += 1  # the LiNeS auto-alpha measure pass (as Plan.summary counts it)
    return passes


def build_plan(recipe: Recipe, sources: InputOptions | None = None) -> Plan:
    """Open the inputs (headers only) and check that the recipe can run on them. ``sources`` says how
    remote inputs are read (Hub ids downloaded or streamed by range; ranges cached for multi-pass
    methods)."""
    sources = sources or InputOptions()
    cache_ranges = input_passes(recipe) > 1  # streamed or URL inputs read more than once: keep ranges
    inputs: list[Checkpoint] = []
    try:
        for i, source in enumerate(recipe.inputs):
            inputs.append(open_input(source, sources, cache_ranges, base=_adapter_base(recipe, i)))
            if source in recipe.adapter_bases and not isinstance(inputs[-1], AdapterCheckpoint):
                raise RecipeError(
                    f"{source} is applied to {recipe.adapter_bases[source]} as a LoRA adapter, but it "
                    "is not a PEFT adapter folder",
                    hint="an adapter folder holds adapter_config.json and adapter_model.safetensors",
                    path=source,
                )
        for source in extra_inputs(recipe.inputs, recipe.layer_slices):  # slices' own models
            inputs.append(open_input(source, sources, cache_ranges, base=recipe.adapter_bases.get(source)))
        if recipe.spec.output == "scatter":
            return _plan_scatter(recipe, inputs)
        if recipe.slices or recipe.spec.name == "passthrough":
            return _plan_stack(recipe, inputs)
        return _plan(recipe, inputs)
    except BaseException:
        for ckpt in inputs:
            ckpt.close()
        raise


def _adapter_base(recipe: Recipe, i: int) -> str | None:
    """The model input ``i`` would be applied to if it is a LoRA adapter: the base its task vector is
    taken against (transfer: the old base), else None (the adapter's own base_model_name_or_path)."""
    inputs = recipe.inputs
    if inputs[i] in recipe.adapter_bases:  # applied to a model of its own (mergekit's model+lora)
        return recipe.adapter_bases[inputs[i]]
    if recipe.spec.tau_from is TAU_PAIRS:  # (new base, old base, old fine-tune)
        return inputs[1] if i == 2 else None
    return recipe.base if recipe.base and i > 0 else None


def _plan(recipe: Recipe, inputs: list[Checkpoint]) -> Plan:
    reference = inputs[0]
    labels = [("base " if recipe.base and i == 0 else "model ") + c.source for i, c in enumerate(inputs)]
    problems: list[str] = []
    notes: list[str] = []
    updates: dict = {}
    if recipe.layer_slices:  # output tensors merged from other blocks: a source name per input
        paths = [*recipe.inputs, *extra_inputs(recipe.inputs, recipe.layer_slices)]
        picks, updates = slice_picks(recipe.layer_slices, inputs, paths)
        notes.append(f"layer slices: {updates.get('num_hidden_layers', '?')} output blocks")
    else:
        picks = [(name, None, None) for name in sorted(reference.tensors, key=natural_key)]
        for ckpt, label in zip(inputs[1:], labels[1:]):
            extra = sorted(set(ckpt.tensors) - set(reference.tensors), key=natural_key)
            for name in extra:
                problems.append(f"tensor {name!r} is in {label} but not in {labels[0]}")
    jobs = []
    spec = recipe.spec
    given = spec.tau_from is TAU_GIVEN
    row_map = _vocab_alignment(recipe, inputs, notes) if spec.tau_from is TAU_PAIRS else None
    n_inputs = len(recipe.inputs)
    tokenizer_files: dict[str, bytes | None] = {}
    if recipe.tokenizer is not None or recipe.chat_template is not None:
        if any(s.inputs for s in recipe.layer_slices):
            raise RecipeError(
                "a tokenizer alignment with slices that merge other models per slice is not supported yet",
                hint="use tokenizer source: base, or the same models in every slice",
            )
        rows = [next((i.shape[0] for n, i in c.tensors.items() if _vocab_indexed(n, [i])), 0) for c in inputs]
        row_map, tokenizer_files, more = align_vocabularies(
            recipe.tokenizer, recipe.chat_template, inputs, list(recipe.inputs), rows
        )
        notes.extend(more)
    for name, sources, read in picks:
        own = read is not None and read != tuple(range(n_inputs))
        job_inputs = [inputs[i] for i in read] if own else inputs[:n_inputs]
        job_labels = [labels[i] for i in read] if own else labels[:n_inputs]
        if given and name not in inputs[1].tensors:  # a diff holds no integer or untouched tensors
            ref = reference.tensors[name]
            jobs.append(TensorJob(name, "copy_base", ref.shape, (ref.dtype.name,), ref.dtype.name))
            continue
        infos = []
        for i, (ckpt, label) in enumerate(zip(job_inputs, job_labels)):
            source = name if sources is None else sources[i]
            info = ckpt.tensors.get(source)
            if info is None:
                hint = (
                    " (tied embeddings? one input stores lm_head, another ties it)"
                    if "lm_head" in source
                    else ""
                )
                problems.append(f"tensor {source!r} is missing from {label}{hint}")
            infos.append(info)
        if any(i is None for i in infos):
            continue
        ref = infos[0]
        kinds = {i.dtype.kind for i in infos}
        aligned = row_map is not None and _vocab_indexed(name, infos)
        for info, label in zip(infos[1:], job_labels[1:]):
            if info.shape != ref.shape and not aligned:
                vocab = (
                    len(info.shape) == len(ref.shape) >= 1
                    and info.shape[1:] == ref.shape[1:]
                    and any(h in name for h in _VOCAB_HINTS)
                )
                what = "vocabulary sizes differ: " if vocab else ""
                fix = (
                    " (resize the embeddings so every input has the same vocabulary, or use "
                    "`surgery transfer`, which aligns rows by token)"
                    if vocab
                    else ""
                )
                problems.append(
                    f"{what}tensor {name!r} has shape {list(info.shape)} in {label} but "
                    f"{list(ref.shape)} in {job_labels[0]}{fix}"
                )
            if info.dtype.kind != ref.dtype.kind or (
                ref.dtype.kind != "float" and info.dtype.name != ref.dtype.name
            ):
                problems.append(
                    f"tensor {name!r} is {info.dtype.name} in {label} but {ref.dtype.name} in {job_labels[0]}"
                )
        if len(kinds) != 1 or (not aligned and any(i.shape != ref.shape for i in infos)):
            continue
        if aligned:
            shape = (row_map.n_out, *ref.shape[1:])
            jobs.append(TensorJob(name, spec.output, shape, tuple(i.dtype.name for i in infos),
                                  recipe.dtype or ref.dtype.name, row_map=row_map))  # fmt: skip
            continue
        kind = ref.dtype.kind
        if kind == "float":
            default = "F32" if spec.output == "update" else ref.dtype.name
            out_dtype = recipe.dtype or (default if default != "F64" else "F32")
            action = spec.output
        elif kind == "int":
            out_dtype, action = ref.dtype.name, "copy_equal"
        else:
            out_dtype, action = ref.dtype.name, "copy_base"
            notes.append(f"{name} ({ref.dtype.name}) is copied from {job_labels[0]}, not merged")
        renamed = None if sources is None or set(sources) == {name} else sources
        jobs.append(TensorJob(name, action, ref.shape, tuple(i.dtype.name for i in infos), out_dtype,
                              sources=renamed, inputs=read if own else None))  # fmt: skip
    if problems:
        raise PlanError(
            problems,
            hint="every input must be a fine-tune of the same architecture as the base "
            "(check with `surgery inspect`)",
        )
    if recipe.lines is not None:
        jobs = _with_depths(jobs, reference, notes)
    if "region" in recipe.parameters:
        jobs = _with_region(jobs, recipe.parameters["region"], notes)
    if spec.output in ("update", "patch"):  # a diff or patch carries the computed tensors only
        jobs = [j for j in jobs if j.kind == spec.output]
    jobs = _with_params(jobs, recipe)
    layout = None
    if spec.output != "patch":
        layout = plan_layout(
            [OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], recipe.max_shard_size
        )
    # config.json from the base (for a diff: from the fine-tune it describes); tokenizer, chat template
    # and generation config from the fine-tune the update came from (a diff carries the fine-tune's)
    config_source = inputs[-1] if spec.config_from == "last" else reference
    tokenizer_source = inputs[-1] if spec.tokenizer_from == "last" else reference
    if recipe.parameters.get("tokenizer_from") == "new-base":
        tokenizer_source = reference
    return Plan(recipe, inputs, jobs, layout, config_source, notes, tokenizer_source=tokenizer_source,
                config_updates=updates, tokenizer_files=tokenizer_files)  # fmt: skip


def _vocab_indexed(name: str, infos: list) -> bool:
    """Embedding-like tensors whose rows are tokens (same trailing dims in every input)."""
    shapes = [i.shape for i in infos]
    return (
        any(h in name for h in _VOCAB_HINTS)
        and all(len(s) == 2 for s in shapes)
        and len({s[1:] for s in shapes}) == 1
    )


def _vocab_alignment(recipe: Recipe, inputs: list[Checkpoint], notes: list[str]) -> RowMap | None:
    """Transfer: a row map when the three vocabularies differ, else None (rows by index)."""
    vocabs = [load_vocab(c.root) for c in inputs]  # new base, old base, old fine-tune
    if any(v is None for v in vocabs):
        notes.append("no tokenizer files in every input: embedding rows are matched by index")
        return None
    tokenizer_from = recipe.parameters.get("tokenizer_from", "finetuned")
    if vocabs[0] == vocabs[1] == vocabs[2]:
        return None
    rows = []
    for ckpt in inputs:
        embeds = [i for n, i in ckpt.tensors.items() if _vocab_indexed(n, [i])]
        if not embeds:
            return None
        rows.append(embeds[0].shape[0])
    row_map = align_rows(vocabs[0], vocabs[1], vocabs[2], tuple(rows), tokenizer_from)
    carried = int((row_map.mode == 1).sum())
    notes.append(
        f"vocabularies differ: embedding rows aligned by token string ({row_map.n_out} output rows, "
        f"{carried} carried over from the fine-tune, {len(row_map.dropped)} tokens of the other "
        "vocabulary not in the output)"
    )
    return row_map


def _with_region(jobs: list[TensorJob], region: str | None, notes: list[str]) -> list[TensorJob]:
    """Mark the float tensors the selection may touch: a regex, or by default the blocks."""
    pattern = re.compile(region) if region else None
    out = []
    for j in jobs:
        inside = bool(pattern.search(j.name)) if pattern else place(j.name).block is not None
        out.append(j if inside or j.kind not in MERGED else replace(j, kind="keep_base"))
    chosen = sum(1 for j in out if j.kind in MERGED)
    if chosen == 0:
        raise PlanError(
            [f"the region {region or '(transformer blocks)'} matches no float tensor"],
            hint="check the names with `surgery inspect --layers` and pass --region REGEX",
        )
    notes.append(f"region: {chosen} of {sum(1 for j in jobs if j.kind in MERGED)} float tensors")
    return out


def _plan_scatter(recipe: Recipe, inputs: list[Checkpoint]) -> Plan:
    """apply_patch / compose: jobs are the target's tensors; every patch's (or dense diff's) entries
    must fit them, and several patches must come from one base (unless ``force_base``)."""
    target, patches = inputs[0], inputs[1:]
    problems = []
    if len(patches) > 1 and not recipe.parameters.get("force_base"):
        problems += base_conflicts(patches)
    touched_by = [touched(p) for p in patches]
    for patch, counts in zip(patches, touched_by):
        shapes = (read_manifest(patch.root) or {}).get("tensors", {})
        for name, count in sorted(counts.items(), key=lambda kv: natural_key(kv[0])):
            info = target.tensors.get(name)
            shape = list(patch.tensors[name].shape) if count == DENSE else shapes.get(name, {}).get("shape")
            of = f" of {patch.source}" if len(patches) > 1 else ""
            if info is None:
                problems.append(f"patch tensor {name!r}{of} is not in target {target.source}")
            elif info.dtype.kind != "float":
                problems.append(f"patch tensor {name!r} is {info.dtype.name} in {target.source}, not a float")
            elif shape is not None and tuple(shape) != info.shape:
                problems.append(
                    f"patch tensor {name!r}{of} was taken from shape {shape} but the target's is "
                    f"{list(info.shape)}"
                )
            elif count > info.numel:
                problems.append(f"patch tensor {name!r} has {count} entries for {info.numel} elements")
    if problems:
        hint = "apply a patch to the base it was taken from or a same-shape release"
        if len(patches) > 1:
            hint += "; --force-base composes patches taken from different bases anyway"
        raise PlanError(problems, hint=hint)
    jobs = []
    for name in sorted(target.tensors, key=natural_key):
        info = target.tensors[name]
        out_dtype = recipe.dtype or info.dtype.name if info.dtype.kind == "float" else info.dtype.name
        counts = tuple(c.get(name, 0) for c in touched_by)
        if any(counts):
            jobs.append(TensorJob(name, "scatter", info.shape, (info.dtype.name,), out_dtype,
                                  patch_counts=counts, params=recipe.parameters))  # fmt: skip
        else:
            jobs.append(TensorJob(name, "copy_base", info.shape, (info.dtype.name,), info.dtype.name))
    layout = plan_layout([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], recipe.max_shard_size)
    return Plan(recipe, inputs, jobs, layout, target, [], tokenizer_source=inputs[-1])


def _with_depths(jobs: list[TensorJob], reference: Checkpoint, notes: list[str]) -> list[TensorJob]:
    """LiNeS needs every merged tensor's block: unplaceable names and a block count that
    disagrees with config.json are errors, never guesses."""
    merged = [j.name for j in jobs if j.kind in MERGED]
    layers = layer_map(merged, reference.config())
    problems = [
        f"cannot tell which block tensor {name!r} belongs to (needed for LiNeS)" for name in layers.unknown
    ]
    if not layers.consistent:
        problems.append(
            f"the tensor names show {layers.num_blocks} blocks but config.json says {layers.config_layers}"
        )
    if layers.num_blocks == 0:
        problems.append("no transformer blocks found in the tensor names (needed for LiNeS)")
    if problems:
        raise PlanError(
            problems,
            hint="LiNeS scales updates by block depth; see surgery/names.py for the name patterns "
            "it understands",
        )
    depth = depths(layers, merged)
    notes.append(f"LiNeS: {layers.num_blocks} blocks")
    return [replace(j, depth=depth.get(j.name)) for j in jobs]


def _with_params(jobs: list[TensorJob], recipe: Recipe) -> list[TensorJob]:
    """Each job's parameters: the recipe's, with the tensor's own values (``per_tensor``) on top."""
    names = {j.name for j in jobs if j.kind in MERGED}
    stray = sorted(set(recipe.per_tensor) - names, key=natural_key)
    if stray:
        raise PlanError(
            [f"per_tensor names {n!r}, which is not a tensor the method computes" for n in stray],
            hint="per_tensor keys are tensor names as `surgery inspect --layers` lists them",
        )
    own = recipe.per_tensor
    return [
        replace(j, params={**recipe.parameters, **own.get(j.name, {})}) if j.name in names else j
        for j in jobs
    ]


def _plan_stack(recipe: Recipe, inputs: list[Checkpoint]) -> Plan:
    """Passthrough: copy layer ranges of the models into consecutive output blocks (renumbered);
    embeddings from the first slice's model, final norm and head from the last slice's."""
    maps = [layer_map(list(c.tensors), c.config()) for c in inputs]
    slices = recipe.slices or ((0, 0, maps[0].num_blocks),)
    problems = [
        f"slice {i}: layers [{a}, {b}) but {inputs[m].source} has {maps[m].num_blocks} blocks"
        for i, (m, a, b) in enumerate(slices)
        if b > maps[m].num_blocks
    ]
    if problems:
        raise PlanError(problems, hint="layer ranges are [start, end) block indices of that model")
    picks: list[tuple[str, int, str]] = []  # (output name, input, source name)

    def outside(model: int, where: tuple[str, ...]) -> None:
        names = sorted(inputs[model].tensors, key=natural_key)
        picks.extend((n, model, n) for n in names if maps[model].placements[n].position in where)

    outside(slices[0][0], ("before",))
    out_block = 0
    for model, start, end in slices:
        names = sorted(inputs[model].tensors, key=natural_key)
        for block in range(start, end):
            picks += [
                (with_block(n, out_block), model, n)
                for n in names
                if maps[model].placements[n].block == block
            ]
            out_block += 1
    outside(slices[-1][0], ("after", "unknown"))
    floats = {out for out, model, name in picks if inputs[model].tensors[name].dtype.kind == "float"}
    stray = sorted(set(recipe.per_tensor) - floats, key=natural_key)
    if stray:
        raise PlanError([f"per_tensor names {n!r}, which is not a float tensor of the stack" for n in stray],
                        hint="per_tensor keys are output tensor names (blocks renumbered)")  # fmt: skip
    jobs = []
    for out_name, model, name in picks:
        info = inputs[model].tensors[name]
        out_dtype = (recipe.dtype or info.dtype.name) if info.dtype.kind == "float" else info.dtype.name
        n = len(inputs)
        params = {**recipe.parameters, **recipe.per_tensor.get(out_name, {})} if out_name in floats else {}
        jobs.append(TensorJob(out_name, "copy_base", info.shape, (info.dtype.name,) * n, out_dtype,
                              params=params, sources=(name,) * n, copy_from=model))  # fmt: skip
    layout = plan_layout([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], recipe.max_shard_size)
    first = inputs[slices[0][0]]
    updates = layer_count_updates(first.config(), [(inputs[m].config(), a, b) for m, a, b in slices])
    notes = [f"layer stack: {out_block} blocks from {len(slices)} slice(s)"]
    files = align_vocabularies(None, recipe.chat_template, [first], [], [])[1] if recipe.chat_template else {}
    return Plan(recipe, inputs, jobs, layout, first, notes, tokenizer_source=first, config_updates=updates,
                tokenizer_files=files)  # fmt: skip


def input_paths(plan: Plan) -> list[Path]:
    """The inputs as the user named them (folders or single files), for the output-overlap check."""
    return [Path(c.source) for c in plan.inputs]
