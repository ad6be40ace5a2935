"""Issue 10, item 17: mutated shard headers and index files never crash a command or leave a
finished-looking output.

A seeded mutator damages a copy of a real sharded checkpoint (byte flips in the header, the length
field, swapped / overlapping / out-of-range offsets, huge or negative shapes, unknown dtypes, odd JSON
values, truncation, appended bytes, index entries that point elsewhere) and runs `inspect`, `merge`,
`diff` or `apply` on it in-process. Every run must either succeed (the damage was harmless, e.g. a
changed metadata value) or fail with `error:` and exit code 1 without creating output weights. A few
two hundred cases run in the default suite (~5 s), ten thousand with `-m slow`.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SHAPES = {"model.embed_tokens.weight": (12, 4), "model.layers.0.w": (4, 4), "model.layers.1.w": (4, 4),
          "model.norm.weight": (4,), "lm_head.weight": (12, 4)}  # fmt: skip
SHARDS = {"model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.layers.0.w"],
          "model-00002-of-00002.safetensors": ["model.layers.1.w", "model.norm.weight", "lm_head.weight"]}  # fmt: skip
INDEX = "model.safetensors.index.json"


def _write_sharded(folder: Path, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    weight_map = {}
    for shard, names in SHARDS.items():
        save_file({n: tensors[n] for n in names}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """base, ft1, ft2 (sharded, with an index) and a dense diff of ft1, written by surgery itself."""
    from click.testing import CliRunner
    from surgery_cli.main import cli

    root = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    _write_sharded(root / "base", base)
    for i in (1, 2):
        _write_sharded(root / f"ft{i}", {n: t + 0.01 * i for n, t in base.items()})
    res = CliRunner().invoke(cli, ["diff", str(root / "base"), str(root / "ft1"), "-o", str(root / "diff"),
                                   "-q", "--max-shard-size", "300B"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list((root / "diff").glob("*.safetensors"))) > 1  # sharded, with an index
    return root


# -- the mutator --------------------------------------------------------------------------------------
def _header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n, _ = _header(data)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


ODD_VALUES = [None, True, -1, 0, 2**63, 2**64 + 5, 1e308, float("inf"), float("nan"), "12", "x", [], {},
              [1, 2, 3], [-5, 3], [2**40, 2**40], [1.5, 2], {"a": 1}]  # fmt: skip


def mutate_shard(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random kind of damage to a safetensors file; returns (bytes, what was done)."""
    n, header = _header(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(10)
    if kind == 0:  # flip bytes inside the header JSON
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(b), "header byte flips"
    if kind == 1:  # the length field
        value = rng.choice(
            [0, 1, n - 1, n + 1, len(data), len(data) - 8, 2**63, 2**64 - 1, rng.randrange(2**32)]
        )
        return struct.pack("<Q", value) + data[8:], f"length field {value}"
    if kind == 2:  # truncation
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated at {cut}"
    if kind == 3:  # appended bytes
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), "appended bytes"
    name = rng.choice(names)
    entry = header[name]
    start, end = entry["data_offsets"]
    if kind == 4:  # swapped / shifted / overlapping offsets
        other = header[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start - 1, end - 1], [start + 4, end + 4],
                                            list(other), [start, end + 4], [0, end], [start, 10**12]])  # fmt: skip
        what = f"offsets of {name} -> {entry['data_offsets']}"
    elif kind == 5:  # shapes: huge, negative, empty, wrong rank
        entry["shape"] = rng.choice([[2**40, 2**40], [-1, 16], [], [0], [10**30], [3, 3, 3, 3], [1] * 64])
        what = f"shape of {name} -> {entry['shape']}"
    elif kind == 6:  # dtype
        entry["dtype"] = rng.choice(["F128", "bf16", "", "I64", "U8", "F8_E4M3", "BOOL", 7, None])
        what = f"dtype of {name} -> {entry['dtype']!r}"
    elif kind == 7:  # odd JSON values anywhere in an entry
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry[field] = rng.choice(ODD_VALUES)
        what = f"{field} of {name} -> {entry[field]!r}"
    elif kind == 8:  # metadata / entries of the wrong type, missing or extra keys
        choice = rng.randrange(5)
        if choice == 0:
            header["__metadata__"] = rng.choice(ODD_VALUES)
        elif choice == 1:
            header[name] = rng.choice(ODD_VALUES)
        elif choice == 2:
            del entry[rng.choice(["dtype", "shape", "data_offsets"])]
        elif choice == 3:
            header[name + "_twin"] = dict(entry)  # a second tensor on the same bytes
        else:
            del header[name]  # its bytes become a hole
        what = f"structure #{choice} at {name}"
    else:  # a whole new header of huge counts
        header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                  for i in range(rng.choice([1000, 20000]))}  # fmt: skip
        what = "a header with many tensors"
    return _with_header(data, header), what


def mutate_index(text: str, rng: random.Random) -> tuple[str, str]:
    index = json.loads(text)
    wm = index["weight_map"]
    name = rng.choice(sorted(wm))
    kind = rng.randrange(6)
    if kind == 0:
        b = bytearray(text.encode())
        b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("latin-1"), "index byte flip"
    if kind == 1:
        wm[name] = rng.choice(["missing.safetensors", "../base/model-00001-of-00002.safetensors", "/etc/passwd",
                               "", ".", "sub/x.safetensors", 5, None])  # fmt: skip
    elif kind == 2:
        wm[name] = sorted(set(wm.values()) - {wm[name]})[0]  # the other shard: it lacks this tensor
    elif kind == 3:
        del wm[name]  # the shard holds a tensor the index does not list
    elif kind == 4:
        index["weight_map"] = rng.choice(ODD_VALUES)
    else:
        wm[name + ".extra"] = wm[name]
    return json.dumps(index), f"index mutation {kind} at {name}"


# -- running one case -----------------------------------------------------------------------------------
def run_case(root: Path, work: Path, seed: int) -> None:
    from click.testing import CliRunner
    from surgery_cli.main import cli

    rng = random.Random(seed)
    command = rng.choice(["inspect", "merge", "diff", "apply"])
    victim = rng.choice(["ft1", "base"]) if command != "apply" else "diff"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    shutil.copytree(root / victim, work / victim)  # only the damaged input is copied
    for name in {"base", "ft1", "ft2", "diff"} - {victim}:
        (work / name).symlink_to(root / name)
    folder = work / victim
    if rng.random() < 0.25:
        path = folder / INDEX
        damaged, what = mutate_index(path.read_text(), rng)
        path.write_bytes(damaged.encode("utf-8", "surrogatepass") if isinstance(damaged, str) else damaged)
    else:
        path = rng.choice(sorted(folder.glob("*.safetensors")))
        damaged, what = mutate_shard(path.read_bytes(), rng)
        path.write_bytes(damaged)
    out = work / "out"
    args = {
        "inspect": ["inspect", folder, "--json"],
        "merge": [
            "merge",
            work / "ft1",
            work / "ft2",
            "--base",
            work / "base",
            "-o",
            out,
            "-q",
            "--threads",
            "1",
        ],
        "diff": ["diff", work / "base", work / "ft1", "-o", out, "-q", "--threads", "1"],
        "apply": ["apply", work / "diff", "--to", work / "base", "-o", out, "-q", "--threads", "1"],
    }[command]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    case = f"seed {seed}: {command} with {victim}/{path.name}: {what}"
    assert result.exit_code in (0, 1), (case, result.exit_code, result.output, result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"{case}: traceback\n{tb}")
    if result.exit_code == 1:
        assert result.stderr.startswith("error: "), (case, result.stderr)
        finished = list(out.glob("*.safetensors")) + list(out.glob(INDEX)) if out.exists() else []
        assert not finished, (case, finished)  # no finished-looking output


def test_fuzz_headers_quick(pristine, tmp_path):
    for seed in range(200):
        run_case(pristine, tmp_path / "w", seed)


@pytest.mark.slow
def test_fuzz_headers_many(pristine, tmp_path):
    for seed in range(200, 10200):
        run_case(pristine, tmp_path / "w", seed)
