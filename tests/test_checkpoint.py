"""Opening checkpoints (file, folder, sharded folder), reading raw bits, and the writer's byte layout.

References are safetensors' own reader and writer: our reads must give the same bits as
``safetensors.torch.load_file`` and our layouts the same bytes as ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.dtypes import DTYPES
from surgery.errors import InputNotFoundError, MissingTensorError
from surgery.writer import OutputTensor, plan_layout, safetensors_header

ST_NAME = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# torch dtype of the same width whose bits we compare (torch cannot .numpy() a bfloat16)
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(3, 11, generator=g).to(torch.float16),
        "w.f32": torch.randn(13, 3, generator=g),
        "ids.i64": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "scalar.f32": torch.tensor(3.25),
        "empty.f32": torch.zeros(0, 4),
        "mask.u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "x.f64": torch.randn(4, generator=g, dtype=torch.float64),
    }


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.view(BITS[t.element_size()]).numpy() if t.dtype != torch.bool else t.numpy().view(np.uint8)


def assert_reads_like_safetensors(ckpt, expected: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.tensors) == set(expected)
    for name, ref in expected.items():
        info = ckpt.tensors[name]
        assert info.dtype.name == ST_NAME[ref.dtype], name
        assert info.shape == tuple(ref.shape), name
        got = ckpt.read(name)
        assert got.shape == tuple(ref.shape)
        assert got.dtype == DTYPES[info.dtype.name].storage
        np.testing.assert_array_equal(got.view(bits(ref).dtype), bits(ref), err_msg=name)


# -- opening ----------------------------------------------------------------------------------------
def test_open_single_file(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    with open_checkpoint(path) as ckpt:
        assert ckpt.files == (path,)
        assert ckpt.root == tmp_path
        assert ckpt.metadata == {"format": "pt", "note": "x"}
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert ckpt.num_parameters == sum(t.numel() for t in tensors.values())
        assert_reads_like_safetensors(ckpt, load_file(str(path)))


def test_open_folder_with_model_safetensors(tmp_path):
    tensors = mixed_tensors(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    with open_checkpoint(str(tmp_path)) as ckpt:
        assert ckpt.files == (tmp_path / "model.safetensors",)
        assert ckpt.root == tmp_path
        assert ckpt.config() == {"num_hidden_layers": 3}
        assert_reads_like_safetensors(ckpt, tensors)


def test_open_folder_with_one_oddly_named_file(tmp_path):
    tensors = mixed_tensors(2)
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        assert [p.name for p in ckpt.files] == ["adapter.safetensors"]
        assert_reads_like_safetensors(ckpt, tensors)


def test_open_sharded_folder(tmp_path):
    tensors = mixed_tensors(3)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for fname, group in shards.items():
        save_file({n: tensors[n] for n in group}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    with open_checkpoint(tmp_path) as ckpt:
        assert [p.name for p in ckpt.files] == sorted(shards)
        for name, fname in weight_map.items():
            assert ckpt.tensors[name].path == tmp_path / fname
        assert ckpt.metadata == {"format": "pt"}
        assert_reads_like_safetensors(ckpt, tensors)


def test_open_missing_and_unknown_tensor(tmp_path):
    with pytest.raises(InputNotFoundError, match="checkpoint not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(InputNotFoundError, match="no safetensors weights"):
        open_checkpoint(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ckpt, pytest.raises(MissingTensorError, match="'b'") as err:
        ckpt.read("b")
    assert isinstance(err.value, KeyError) and err.value.tensor == "b"


# -- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_read_equals_safetensors_bits(tmp_path, dtype):
    g = torch.Generator().manual_seed(4)
    if dtype.is_floating_point:
        t = torch.randn(33, 17, generator=g).to(dtype)
        t[0, :4] = torch.tensor([float("inf"), -0.0, float("nan"), 1e-40]).to(dtype)  # odd bit patterns
    else:
        t = torch.randint(-(2**62), 2**62, (33, 17), generator=g, dtype=dtype)
    save_file({"t": t, "pad": torch.ones(3, dtype=torch.uint8)}, str(tmp_path / "model.safetensors"))
    ref = load_file(str(tmp_path / "model.safetensors"))["t"]
    with open_checkpoint(tmp_path) as ckpt:
        got = ckpt.read("t")
    np.testing.assert_array_equal(got.view(bits(ref).dtype), bits(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_read_into_partial_ranges(tmp_path, dtype):
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(10, 9, generator=g) * 100).to(dtype)
    save_file({"a": torch.zeros(5), "t": t}, str(tmp_path / "model.safetensors"))
    flat = bits(t).reshape(-1)
    with open_checkpoint(tmp_path) as ckpt:
        storage = ckpt.tensors["t"].dtype.storage
        for start, count in [(0, 1), (0, 90), (89, 1), (13, 27), (45, 45), (7, 0)]:
            out = np.full(count, 7, dtype=storage)
            assert ckpt.read_into("t", start, out) is out
            np.testing.assert_array_equal(out.view(flat.dtype), flat[start : start + count])
        # a 2-D destination is filled in C order
        out = np.empty((3, 9), dtype=storage)
        ckpt.read_into("t", 18, out)
        np.testing.assert_array_equal(out.reshape(-1).view(flat.dtype), flat[18:45])


# -- writer layout ----------------------------------------------------------------------------------
def write_layout_files(tmp_path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> dict:
    """Write every shard of ``plan_layout`` as the engine does: header, then data at its offsets."""
    outs = [OutputTensor(n, ST_NAME[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    layout = plan_layout(outs, max_shard_size)
    files = {}
    for shard in layout.shards:
        buf = bytearray(shard.size)
        buf[: len(shard.header)] = shard.header
        for name, offset in shard.offsets.items():
            data = bits(tensors[name]).tobytes()
            buf[offset : offset + len(data)] = data
        files[shard.filename] = (bytes(buf), sorted(shard.offsets))
    return files


def assert_like_save_file(tmp_path, tensors: dict[str, torch.Tensor], max_shard_size: int = 10**9) -> None:
    files = write_layout_files(tmp_path, tensors, max_shard_size)
    for fname, (data, names) in files.items():
        ref = tmp_path / f"ref-{fname}"
        save_file({n: tensors[n] for n in names}, str(ref), metadata={"format": "pt"})
        assert data == ref.read_bytes(), fname


def test_writer_single_file_byte_identical_to_save_file(tmp_path):
    tensors = mixed_tensors(6)
    files = write_layout_files(tmp_path, tensors, 10**9)
    assert list(files) == ["model.safetensors"]
    assert_like_save_file(tmp_path, tensors)


def test_writer_shards_byte_identical_to_save_file(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = {f"layers.{i}.w": torch.randn(8, 8, generator=g) for i in range(12)}
    tensors.update({f"layers.{i}.b": torch.randn(8, generator=g).to(torch.bfloat16) for i in range(12)})
    files = write_layout_files(tmp_path, tensors, 700)
    assert len(files) > 2
    assert list(files)[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert_like_save_file(tmp_path, tensors, 700)


def test_plan_layout_shards_like_transformers():
    outs = [OutputTensor(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 bytes each
    layout = plan_layout(outs + [OutputTensor("big", "F32", (100,))], 100)
    assert [sorted(s.offsets) for s in layout.shards] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"]]
    index = json.loads(layout.index_json())
    assert index["metadata"] == {"total_size": 600, "total_parameters": 150}
    assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"


@pytest.mark.parametrize("metadata", [{"format": "pt"}, {}])
def test_safetensors_header_matches_save_file(tmp_path, metadata):
    tensors = mixed_tensors(8)
    header, rel = safetensors_header(
        [OutputTensor(n, ST_NAME[t.dtype], tuple(t.shape)) for n, t in tensors.items()], metadata
    )
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata or None)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert header == ref[: len(header)]
    assert len(header) % 8 == 0
    for name, off in rel.items():
        data = bits(tensors[name]).tobytes()
        assert ref[len(header) + off : len(header) + off + len(data)] == data, name


@pytest.mark.parametrize(
    "pair", [(torch.int32, torch.float32), (torch.float16, torch.bfloat16), (torch.float64, torch.int64)]
)
def test_writer_same_itemsize_dtypes_byte_identical_to_save_file(tmp_path, pair):
    low, high = pair
    tensors = {"a": torch.ones(3, dtype=low), "b": torch.ones(2, dtype=high)}
    assert_like_save_file(tmp_path, tensors)


def test_read_ahead_hints_run_on_their_own_thread_and_never_fail(tmp_path, monkeypatch):
    """prefetch hands WILLNEED to a thread of its own (it can block while the disk's queue is full);
    the hint opens its own descriptor, so a reader closed meanwhile or a file gone is no error."""
    import threading

    import surgery.checkpoint as ck

    f = tmp_path / "x.bin"
    f.write_bytes(b"\0" * 8192)
    calls = []
    done = threading.Event()

    def fake_fadvise(fd, offset, nbytes, advice):
        calls.append((threading.current_thread() is threading.main_thread(), offset, nbytes, advice))
        done.set()

    monkeypatch.setattr(ck.os, "posix_fadvise", fake_fadvise, raising=False)
    files = ck.LocalFiles()
    files.prefetch(f, 4096, 4096)
    files.close()
    assert done.wait(10)
    assert calls == [(False, 4096, 4096, ck.os.POSIX_FADV_WILLNEED)]
    ck._will_need(tmp_path / "gone.bin", 0, 10)  # a file that is gone: nothing raised
