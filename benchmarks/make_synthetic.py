#!/usr/bin/env python3
"""Write synthetic bf16 checkpoints with real model shapes: a base and N fine-tunes.

    python benchmarks/make_synthetic.py --shape 1b --out /work/bench-data/1b

writes ``OUT/base``, ``OUT/ft1`` .. ``OUT/ftN``, each a Hugging Face style sharded checkpoint
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` + ``config.json``), and
``OUT/synthetic.json`` (the parameters used) once everything is written. ``--blocks N`` writes only the first
N decoder blocks at the shape's widths: a slice on which per-matrix methods are timed at real
matrix sizes.

Values: every matrix of the base is N(0, 0.02) (Llama's ``initializer_range``), norm weights are
1 + N(0, 0.05); fine-tune k is ``base + update_scale * rms(w) * N(0, 1)``, computed in float32 from
the exact bf16 base values and rounded once (round to nearest even), so ``ft - base`` is a real,
small task vector and merges are meaningful.

Speed and memory: nothing bigger than a pool of random numbers (2 x 2^24 float32) and one chunk
buffer is ever held. Each tensor is built chunk by chunk from slices of the pools taken at offsets
drawn from a per-tensor RNG (the data is synthetic: reusing random blocks is fine), and each shard
is written sequentially after a header computed up front. Only numpy is needed; ``--verify``
additionally reads every tensor back with ``safetensors.safe_open`` (needs safetensors + torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

POOL_BITS = 24  # 16.7M float32 per pool (64 MiB)
POOL = 1 << POOL_BITS
CHUNK = 1 << 20  # elements per write (2 MiB of bf16)
GB = 1000**3

# name -> dims. tie: lm_head tied to embed_tokens (then not written), as in the real model.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden=64,
        layers=2,
        inter=128,
        vocab=256,
        heads=4,
        kv_heads=2,
        head_dim=16,
        tie=False,
        rope_theta=10000.0,
        max_pos=2048,
        eps=1e-6,
        shard=100_000,
    ),
    # Qwen2.5-0.5B dims (Llama-style names, no q/k/v biases)
    "0.5b": dict(
        hidden=896,
        layers=24,
        inter=4864,
        vocab=151936,
        heads=14,
        kv_heads=2,
        head_dim=64,
        tie=True,
        rope_theta=1000000.0,
        max_pos=32768,
        eps=1e-6,
        shard=2 * GB,
    ),
    # Llama-3.2-1B dims
    "1b": dict(
        hidden=2048,
        layers=16,
        inter=8192,
        vocab=128256,
        heads=32,
        kv_heads=8,
        head_dim=64,
        tie=True,
        rope_theta=500000.0,
        max_pos=131072,
        eps=1e-5,
        shard=2 * GB,
    ),
    # Llama-3-8B dims
    "8b": dict(
        hidden=4096,
        layers=32,
        inter=14336,
        vocab=128256,
        heads=32,
        kv_heads=8,
        head_dim=128,
        tie=False,
        rope_theta=500000.0,
        max_pos=8192,
        eps=1e-5,
        shard=2 * GB,
    ),
    # Llama-3-70B widths, 4 decoder blocks, untied 128256 x 8192 embedding and head: 11 GB per model,
    # so base + 2 fine-tunes (33 GB) exceed a 24 GiB machine's RAM (the out-of-RAM benchmark)
    "70b-slice": dict(
        hidden=8192,
        layers=4,
        inter=28672,
        vocab=128256,
        heads=64,
        kv_heads=8,
        head_dim=128,
        tie=False,
        rope_theta=500000.0,
        max_pos=8192,
        eps=1e-5,
        shard=5 * GB,
    ),
}

MATRIX = (0.0, 0.02)  # mean, std
NORM = (1.0, 0.05)


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return 2 * self.numel


def tensor_specs(dims: dict) -> list[TensorSpec]:
    h, i, v = dims["hidden"], dims["inter"], dims["vocab"]
    q = dims["heads"] * dims["head_dim"]
    kv = dims["kv_heads"] * dims["head_dim"]
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), *MATRIX)]
    for layer in range(dims["layers"]):
        p = f"model.layers.{layer}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), *NORM),
            TensorSpec(p + "self_attn.q_proj.weight", (q, h), *MATRIX),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h), *MATRIX),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h), *MATRIX),
            TensorSpec(p + "self_attn.o_proj.weight", (h, q), *MATRIX),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), *NORM),
            TensorSpec(p + "mlp.gate_proj.weight", (i, h), *MATRIX),
            TensorSpec(p + "mlp.up_proj.weight", (i, h), *MATRIX),
            TensorSpec(p + "mlp.down_proj.weight", (h, i), *MATRIX),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), *NORM))
    if not dims["tie"]:
        specs.append(TensorSpec("lm_head.weight", (v, h), *MATRIX))
    return specs


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in model order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """u64 LE length + JSON header padded with spaces to a multiple of 8."""
    header: dict = {}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    header["__metadata__"] = {"format": "pt"}
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js


def f32_to_bf16_bits(x: np.ndarray, out16: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bits (uint16). No NaNs occur here.

    x: float32 (read only), out16: uint16 of the same length, tmp: uint32 scratch."""
    u = x.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, u, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out16, tmp, casting="unsafe")
    return out16


class Generator:
    """Holds the random pools and scratch buffers; yields bf16 chunks of any tensor."""

    def __init__(self, seed: int, update_scale: float):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.raw_base = rng.standard_normal(POOL, dtype=np.float32)
        self.raw_delta = rng.standard_normal(POOL, dtype=np.float32)
        self.seed = seed
        self.update_scale = update_scale
        self._pools: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self.f32 = np.empty(CHUNK, np.float32)
        self.f32b = np.empty(CHUNK, np.float32)
        self.u32 = np.empty(CHUNK, np.uint32)
        self.u16 = np.empty(CHUNK, np.uint16)

    def _pool(self, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
        """(bf16 bits, exact float32 of those bits) of mean + std * raw_base, built once."""
        key = (mean, std)
        if key not in self._pools:
            bits = np.empty(POOL, np.uint16)
            tmp32 = np.empty(CHUNK, np.uint32)
            for a in range(0, POOL, CHUNK):
                x = self.f32
                np.multiply(self.raw_base[a : a + CHUNK], np.float32(std), out=x)
                np.add(x, np.float32(mean), out=x)
                f32_to_bf16_bits(x, bits[a : a + CHUNK], tmp32)
            exact = np.left_shift(bits.astype(np.uint32), 16).view(np.float32)
            self._pools[key] = (bits, exact)
        return self._pools[key]

    def chunks(self, spec: TensorSpec, model: int):
        """Yield uint16 arrays (bf16 bits) covering the tensor in order. model 0 = base."""
        bits, exact = self._pool(spec.mean, spec.std)
        crc = zlib.crc32(spec.name.encode())
        nchunks = -(-spec.numel // CHUNK)
        base_off = np.random.default_rng([self.seed, 0, crc]).integers(0, POOL - CHUNK, nchunks)
        if model:
            delta_off = np.random.default_rng([self.seed, model, crc, 1]).integers(0, POOL - CHUNK, nchunks)
            dscale = np.float32(self.update_scale * (spec.mean**2 + spec.std**2) ** 0.5)
        for c in range(nchunks):
            n = min(CHUNK, spec.numel - c * CHUNK)
            b = int(base_off[c])
            if not model:
                yield bits[b : b + n]
                continue
            d = int(delta_off[c])
            x, y = self.f32[:n], self.f32b[:n]
            np.multiply(self.raw_delta[d : d + n], dscale, out=y)
            np.add(exact[b : b + n], y, out=x)
            yield f32_to_bf16_bits(x, self.u16[:n], self.u32[:n])

    def tensor(self, spec: TensorSpec, model: int) -> np.ndarray:
        """Whole tensor as uint16 (only for small tensors / verification)."""
        return np.concatenate([c.copy() for c in self.chunks(spec, model)]).reshape(spec.shape)


def config_json(dims: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["inter"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "vocab_size": dims["vocab"],
        "max_position_embeddings": dims["max_pos"],
        "rms_norm_eps": dims["eps"],
        "rope_theta": dims["rope_theta"],
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": dims["tie"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }


def write_model(
    gen: Generator,
    dims: dict,
    specs: list[TensorSpec],
    model: int,
    out: str,
    shard_bytes: int,
    fsync: bool = True,
) -> int:
    os.makedirs(out, exist_ok=True)
    shards = plan_shards(specs, shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        path = os.path.join(out, fname)
        tmp = path + ".tmp"
        with open(tmp, "wb", buffering=0) as f:
            f.write(safetensors_header(shard))
            for s in shard:
                for c in gen.chunks(s, model):
                    mv = memoryview(c).cast("B")
                    while mv:
                        k = f.write(mv)
                        mv = mv[k:]
                weight_map[s.name] = fname
                total += s.nbytes
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(
            {"metadata": {"total_size": total, "total_parameters": total // 2}, "weight_map": weight_map},
            f,
            indent=2,
        )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_json(dims), f, indent=2)
    return total


def model_dirs(out: str, finetunes: int) -> list[str]:
    return [os.path.join(out, "base")] + [os.path.join(out, f"ft{k}") for k in range(1, finetunes + 1)]


def params_of(args) -> dict:
    return {
        "shape": args.shape,
        "seed": args.seed,
        "finetunes": args.finetunes,
        "update_scale": args.update_scale,
        "tie": resolve_dims(args)["tie"],
        "shard_bytes": resolve_dims(args)["shard"],
        "version": 1,
    } | ({"blocks": args.blocks} if args.blocks is not None else {})


def resolve_dims(args) -> dict:
    dims = dict(SHAPES[args.shape])
    if args.blocks is not None:
        # a slice: the real widths (so real matrix sizes), fewer decoder blocks
        dims["layers"] = args.blocks
    if args.tie is not None:
        dims["tie"] = args.tie
    if args.shard_size:
        dims["shard"] = parse_size(args.shard_size)
    return dims


def parse_size(s: str) -> int:
    s = s.strip()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    for u, m in units.items():
        if s.upper().endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def is_complete(out: str, params: dict) -> bool:
    try:
        with open(os.path.join(out, "synthetic.json")) as f:
            return json.load(f).get("params") == params
    except (OSError, ValueError):
        return False


def verify(gen: Generator, specs: list[TensorSpec], dirs: list[str]) -> None:
    """Read every tensor back with safetensors.safe_open and compare with the generator."""
    import torch
    from safetensors import safe_open

    for model, d in enumerate(dirs):
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            wmap = json.load(f)["weight_map"]
        assert set(wmap) == {s.name for s in specs}, f"{d}: weight_map names differ"
        handles = {fn: safe_open(os.path.join(d, fn), framework="pt") for fn in set(wmap.values())}
        for fn, h in handles.items():
            assert set(h.keys()) == {k for k, v in wmap.items() if v == fn}, f"{fn}: keys differ"
        for s in specs:
            t = handles[wmap[s.name]].get_tensor(s.name)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == s.shape, s.name
            want = gen.tensor(s, model)
            got = t.view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(got, want), f"{d}:{s.name} values differ"
            if model:
                # the fine-tune is a small update of the base
                base = torch.from_numpy(gen.tensor(s, 0).astype(np.int32) << 16).view(torch.float32)
                diff = t.float() - base
                rel = float(diff.norm() / base.norm())
                assert 0.2 * gen.update_scale < rel < 5 * gen.update_scale, (s.name, rel)
    # rounding check against torch on raw float32 values incl. ties
    x = np.concatenate(
        [
            gen.raw_base[:100000] * np.float32(0.02),
            np.array([1.00390625, 1.01171875, -1.00390625, 3.0e-39], np.float32),
        ]
    )
    mine = f32_to_bf16_bits(x, np.empty(x.size, np.uint16), np.empty(x.size, np.uint32))
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(mine, ref), "bf16 rounding differs from torch"
    print(f"verify: OK ({len(dirs)} models x {len(specs)} tensors read back with safe_open)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True, help="folder; gets base/, ft1/ .. ftN/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--blocks",
        type=int,
        help="decoder blocks written (default: the shape's); e.g. --shape 1b --blocks 2 is a "
        "slice with Llama-3.2-1B's matrix sizes",
    )
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument(
        "--update-scale",
        type=float,
        default=0.02,
        help="fine-tune update std relative to the weights' RMS (default 0.02)",
    )
    tie = ap.add_mutually_exclusive_group()
    tie.add_argument(
        "--tie",
        dest="tie",
        action="store_true",
        default=None,
        help="tie lm_head to embed_tokens (not written); default: as the real model "
        "(0.5b, 1b tied; 8b, tiny untied)",
    )
    tie.add_argument("--untie", dest="tie", action="store_false", help="write lm_head.weight")
    ap.add_argument("--shard-size", help="max shard size, e.g. 2GB (default 2GB; tiny 100KB)")
    ap.add_argument("--force", action="store_true", help="regenerate even if complete")
    ap.add_argument("--no-fsync", action="store_true", help="don't fsync shards (faster, less honest)")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="read every tensor back with safetensors and compare (small shapes)",
    )
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    dims = resolve_dims(args)
    specs = tensor_specs(dims)
    params = params_of(args)
    dirs = model_dirs(args.out, args.finetunes)
    nbytes = sum(s.nbytes for s in specs)
    print(
        f"{args.shape}: {len(specs)} tensors, {nbytes / 2:.4g} params, {nbytes / GB:.3f} GB "
        f"per model, {len(plan_shards(specs, dims['shard']))} shard(s), "
        f"tie_word_embeddings={dims['tie']}",
        flush=True,
    )

    t0 = time.perf_counter()
    gen = Generator(args.seed, args.update_scale)
    if args.force or not is_complete(args.out, params):
        marker = os.path.join(args.out, "synthetic.json")
        if os.path.exists(marker):
            os.remove(marker)
        times = {}
        for model, d in enumerate(dirs):
            t = time.perf_counter()
            write_model(gen, dims, specs, model, d, dims["shard"], fsync=not args.no_fsync)
            times[os.path.basename(d)] = round(time.perf_counter() - t, 3)
            dt = times[os.path.basename(d)]
            print(f"  wrote {d} in {dt:.1f} s ({nbytes / GB / max(dt, 1e-9):.2f} GB/s)", flush=True)
        total = time.perf_counter() - t0
        with open(marker, "w") as f:
            json.dump(
                {
                    "params": params,
                    "bytes_per_model": nbytes,
                    "seconds": times,
                    "total_seconds": round(total, 3),
                },
                f,
                indent=2,
            )
        print(f"generated {len(dirs)} models ({len(dirs) * nbytes / GB:.2f} GB) in {total:.1f} s")
    else:
        print(f"{args.out}: already complete (use --force to regenerate)")
    if args.verify:
        verify(gen, specs, dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
