"""Passthrough and layer stacking ("frankenmerges", as mergekit's passthrough with slices).

The output's blocks are copied, in order, from layer ranges of the models and renumbered from 0:
slices [(model a, 0, 24), (model b, 20, 40)] give 44 blocks, a's 0..23 then b's 20..39. Embeddings
come from the first slice's model, the final norm and head from the last slice's. Nothing is
averaged: every output tensor is a copy (converted to the output dtype when one is given), and
config.json's num_hidden_layers is the sum of the slice lengths. Without slices: a copy of the one
model. ``scale`` multiplies copied float tensors (mergekit's passthrough ``scale``; per tensor through
a recipe's ``per_tensor``, e.g. 0 for o_proj / down_proj).
"""

from surgery.methods.spec import Method, Param

# Every job of a stack is a copy (the planner's copy_base with a source input and name), so the
# default combine stage never runs.
PASSTHROUGH = Method(
    name="passthrough",
    title="Passthrough / layer stacking",
    paper="https://github.com/arcee-ai/mergekit#passthrough",
    formula="blocks_out = concat_s blocks(model_s)[start_s:end_s], renumbered",
    needs_base=False,
    roles="models: the checkpoints whose layer ranges are stacked (recipe 'slices')",
    params=(Param("scale", "float", 1.0, "multiplier of every copied float tensor"),),
)
