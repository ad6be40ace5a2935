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
STAGING = ".surgery-partial"  # a folder holding it is an unfinished run, never a checkpoint

# Files copied beside the weights from the config / tokenizer source.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json",
)  # fmt: skip


def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` (0-based) of ``n``, as transformers names them."""
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
