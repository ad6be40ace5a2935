"""The vocabulary of a checkpoint folder: what a Hugging Face-layout output holds, by name.

A leaf module (no imports) so that every layer (reading, planning, writing, the Hub) names the same
files without importing one another.
"""

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
RECIPE = "surgery_recipe.yaml"  # the recipe that produced the folder: `surgery run` redoes it
MANIFEST = "surgery_diff.json"  # a diff or patch: which base it was taken from
INTRUDERS = "surgery_intruders.json"  # `surgery intruders --mitigate`: what was scaled
STAGING = ".surgery-partial"  # a folder holding it is an unfinished run, never a checkpoint
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder: its config ...
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # ... and its weights
LORA_REPORT = "surgery_lora.json"  # an extracted adapter: rank and energy kept per module
LOCK = "lock"  # in STAGING: flock'ed by the process writing the folder, holds its pid
# A folder holding one of these (or STAGING) is an output surgery wrote: --overwrite may replace it.
MARKERS = (RECIPE, MANIFEST, INTRUDERS, LORA_REPORT)

# Files copied beside the weights from the config / tokenizer source.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json",
)  # fmt: skip


def written_by_surgery(name: str) -> bool:
    """Whether a top-level file of an output folder is one that surgery writes there."""
    if name in (INDEX, SINGLE, CONFIG, CARD, RECIPE, MANIFEST, INTRUDERS, STAGING) or name in SIDE_FILES:
        return True
    if name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_REPORT):  # extract-lora
        return True
    # model-00001-of-00002.safetensors
    parts = name.removesuffix(".safetensors").split("-")
    return (
        name.endswith(".safetensors")
        and len(parts) == 4
        and parts[0] == "model"
        and parts[2] == "of"
        and all(len(p) == 5 and p.isdigit() for p in (parts[1], parts[3]))
    )


def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` (0-based) of ``n``, as transformers names them."""
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
