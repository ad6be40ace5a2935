"""The device-resident pipeline of the torch backend (``surgery.kernels.resident``), on torch CPU
tensors (and on the GPU where there is one): same histograms and same output bytes as numba."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckpt_factory import make_family  # noqa: E402

from surgery.engine import EngineOptions, merge  # noqa: E402
from surgery.kernels import cpu, resident, torch_ops  # noqa: E402
from surgery.methods import get_method  # noqa: E402
from surgery.recipe import make_recipe  # noqa: E402

U32 = np.uint32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ENGINE_DEVICES = ["torch-cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def specials_and_ties(rng: np.random.Generator, n: int) -> np.ndarray:
    """Many equal |x| (one crowded high bin), +-0, subnormals, infs and NaNs, and continuous values."""
    x = (rng.integers(-6, 7, n) * 0.125).astype(np.float32)
    pick = rng.random(n)
    x[pick < 0.3] = rng.standard_normal(int((pick < 0.3).sum())).astype(np.float32)
    x[(pick > 0.9) & (pick < 0.92)] = np.float32(-0.0)
    x[(pick > 0.92) & (pick < 0.93)] = np.float32(1e-41)  # subnormal
    x[(pick > 0.93) & (pick < 0.935)] = np.float32(np.inf)
    x[(pick > 0.935) & (pick < 0.94)] = np.float32(np.nan)
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_histograms_accumulated_on_the_device_equal_numba(device):
    """High and low radix-select histograms, summed over many chunks into device int64 counts."""
    rng = np.random.default_rng(5)
    tw = torch_ops.for_device(device)
    x = specials_and_ties(rng, 20_000)
    chunks = np.array_split(x, 13)
    ref_high, got_high = np.zeros(65536, np.int64), torch.zeros(65536, dtype=torch.int64, device=device)
    for c in chunks:
        cpu.abs_hist_high(c, ref_high)
        tw.abs_hist_high(torch.from_numpy(c).to(device), got_high)
    assert np.array_equal(ref_high, got_high.cpu().numpy())
    # the crowded bin, a sparse one, the NaN/inf bins and an empty one
    bins = [int(np.argmax(ref_high)), int(np.flatnonzero(ref_high)[0]), 0x7F80, 0x7FC0, 0x1234]
    for b in bins:
        ref_low, got_low = np.zeros(65536, np.int64), torch.zeros(65536, dtype=torch.int64, device=device)
        for c in chunks:
            cpu.abs_hist_low(c, U32(b), ref_low)
            tw.abs_hist_low(torch.from_numpy(c).to(device), b, got_low)
        assert np.array_equal(ref_low, got_low.cpu().numpy()), b
        assert ref_low.sum() == ref_high[b]


@pytest.mark.parametrize("device", DEVICES)
def test_workspace_stages_uploads_and_downloads_bits(device):
    ws = resident.DeviceWorkspace(device)
    a = ws.staging("raw0", (100,), np.uint16)
    b = ws.staging("raw0", (100,), np.uint16)
    c = ws.staging("raw0", (100,), np.uint16)
    # two slots, alternating: the next chunk is read while the last one's copy may be in flight
    assert a.ctypes.data != b.ctypes.data and a.ctypes.data == c.ctypes.data
    c[:] = np.arange(65436, 65536, dtype=np.uint16)  # high bit set: unsigned bits through int16
    dev = ws.upload(c)
    assert dev.device.type == torch.device(device).type and dev.dtype == torch.int16
    back = ws.download(dev, "out_raw")
    assert back.dtype == np.uint16 and np.array_equal(back, c)
    f = ws.staging("raw1", (7,), np.float32)
    f[:] = np.array([1.5, -0.0, np.inf, np.nan, 1e-41, -2.0, 3.0], np.float32)
    dec = ws.array("dec", (2, 7), np.float32)
    assert ws.upload(f, dec[1]).data_ptr() == dec[1].data_ptr()  # F32: straight into its row
    assert np.array_equal(ws.to_host(dec[1]).view(U32), f.view(U32))
    assert ws.counts((2, 3)).sum().item() == 0 and ws.counts((2, 3)).dtype == torch.int64


def test_stages_declare_where_they_run():
    """The four mergekit-family methods stream resident; numpy stages and variants do not."""
    for name in ("task_arithmetic", "breadcrumbs", "ties", "dare_ties", "dare", "breadcrumbs_ties"):
        assert get_method(name).on_device({}), name
    assert get_method("ties").on_device({"elect": "weighted"})  # mergekit's variant: a kernel too
    assert get_method("ties").on_device({"disjoint": "sum"})
    assert not get_method("model_stock").on_device({"filter_wise": True})
    for name in ("sce", "nearswap", "lift_patch", "half_reset", "tsv_merge"):
        assert not get_method(name).on_device({}), name


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """BF16 base + 3 fine-tunes with coarse (tied) updates."""
    return make_family(tmp_path_factory.mktemp("fam"), n_models=3, dtype="BF16", quantize=True, seed=3)


@pytest.fixture
def uploads(monkeypatch):
    """Counts the resident pipeline's uploads (one per input per chunk)."""
    calls = []
    original = resident.DeviceWorkspace.upload

    def spy(self, raw, dest=None):
        calls.append(raw.size)
        return original(self, raw, dest)

    monkeypatch.setattr(resident.DeviceWorkspace, "upload", spy)
    return calls


CASES = [
    ("task_arithmetic", {"scale": 0.7, "weights": [1.0, 0.5, 0.25]}, None),
    ("breadcrumbs", {"density": 0.5, "outliers": 0.05}, None),
    ("breadcrumbs", {"density": 0.3, "outliers": 0.02, "granularity": "global"}, None),
    ("breadcrumbs", {"density": 0.5, "outliers": 0.1, "granularity": "per_row"}, None),
    ("ties", {"density": 0.4}, None),
    ("ties", {"density": 0.4, "granularity": "global"}, None),
    ("ties", {"density": 0.4, "elect": "weighted", "weights": [1.0, -0.5, 0.25]}, None),
    ("ties", {"density": 0.4, "disjoint": "sum"}, None),
    ("dare_ties", {"density": 0.4, "seed": 11}, None),
    ("dare", {"density": 0.5, "seed": 2, "rescale": "l1"}, None),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 5}, None),
    ("della_linear", {"density": 0.4, "rescale": "l1"}, None),
    ("breadcrumbs", {"density": 0.5, "outliers": 0.05, "rescale": "l1"}, None),
    ("breadcrumbs", {"density": 0.5, "outliers": 0.05}, {"alpha": "auto"}),
    ("task_arithmetic", {}, {"alpha": 0.5}),
]


def _same_files(ref, out) -> None:
    files = sorted(p.name for p in ref.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in out.glob("*.safetensors"))
    for name in files:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("device", ENGINE_DEVICES)
@pytest.mark.parametrize("method,params,lines", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_resident_merge_bytes_equal_numba_under_a_tiny_budget(
    family, tmp_path, uploads, device, method, params, lines
):
    base, models = family
    recipe = make_recipe(method, [str(m) for m in models], str(base), params, lines=lines)
    merge(recipe, tmp_path / "numba", EngineOptions(device="cpu", threads=1))
    n_before = len(uploads)
    assert n_before == 0
    # 4 KiB for two workers: 2 KiB each, ~50 elements a chunk, so every matrix takes several
    # chunks (tie counters, DARE offsets and histograms carried across them)
    merge(recipe, tmp_path / "dev", EngineOptions(device=device, threads=2, max_memory=4096))
    _same_files(tmp_path / "numba", tmp_path / "dev")
    big = 37 * 12  # the embedding: at least 8 chunks of it, each uploading every input
    assert len(uploads) >= 8 * 4 and max(uploads) < big


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_resident_merge_of_f16_and_f32_inputs(tmp_path, uploads, dtype):
    """F16 inputs are cast on the device; F32 inputs go from staging straight into their rows."""
    base, models = make_family(tmp_path / "f", n_models=2, dtype=dtype, quantize=True, seed=9)
    recipe = make_recipe("dare_ties", [str(m) for m in models], str(base), {"density": 0.5, "seed": 4})
    merge(recipe, tmp_path / "numba", EngineOptions(device="cpu", threads=1))
    merge(recipe, tmp_path / "dev", EngineOptions(device="torch-cpu", threads=1, max_memory=2048))
    _same_files(tmp_path / "numba", tmp_path / "dev")
    assert uploads


def test_a_diff_streams_resident_and_equals_numba(family, tmp_path, uploads):
    """A diff (output kind update: the update alone, hashed inputs) through the resident path."""
    base, models = family
    recipe = make_recipe("diff", [str(models[0])], str(base))
    merge(recipe, tmp_path / "numba", EngineOptions(device="cpu", threads=1))
    merge(recipe, tmp_path / "dev", EngineOptions(device="torch-cpu", threads=2, max_memory=4096))
    _same_files(tmp_path / "numba", tmp_path / "dev")
    manifest = "surgery_diff.json"
    if (tmp_path / "numba" / manifest).exists():  # the content hashes of the base agree
        assert (tmp_path / "numba" / manifest).read_bytes() == (tmp_path / "dev" / manifest).read_bytes()
    assert uploads


def test_numpy_stages_keep_the_host_path(family, tmp_path, uploads):
    """Model Stock per row (filter_wise) runs numpy: no upload, same bytes as numba."""
    base, models = family
    recipe = make_recipe("model_stock", [str(m) for m in models], str(base), {"filter_wise": True})
    merge(recipe, tmp_path / "numba", EngineOptions(device="cpu", threads=1))
    merge(recipe, tmp_path / "dev", EngineOptions(device="torch-cpu", threads=2, max_memory=4096))
    _same_files(tmp_path / "numba", tmp_path / "dev")
    assert uploads == []


def test_transfer_with_aligned_vocabulary_gathers_rows_on_the_device(tmp_path, uploads):
    """Rows gathered by a vocabulary map, carried-over rows patched in on the device (CLI path)."""
    from click.testing import CliRunner
    from safetensors.torch import save_file
    from surgery_cli.main import cli
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    g = torch.Generator().manual_seed(1)

    def model(name: str, tokens: list[str], rows: dict, w: torch.Tensor) -> str:
        folder = tmp_path / name
        folder.mkdir()
        Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(
            str(folder / "tokenizer.json")
        )
        emb = torch.stack([rows[t] for t in tokens]).to(torch.bfloat16)
        tensors = {"model.embed_tokens.weight": emb, "model.layers.0.w": w.to(torch.bfloat16)}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(f'{{"vocab_size": {len(tokens)}, "num_hidden_layers": 1}}')
        return str(folder)

    vocab = [f"tok{i}" for i in range(40)]
    w = torch.randn(16, 16, generator=g)
    old = {t: torch.randn(8, generator=g) for t in vocab}
    ft = {t: v + 0.1 * torch.randn(8, generator=g) for t, v in old.items()} | {"<chat>": torch.randn(8)}
    new = {t: v + 0.01 for t, v in old.items()} | {"newtok": torch.randn(8, generator=g)}
    args = ["transfer", "--from", model("old", vocab, old, w), "--finetuned",
            model("ft", vocab + ["<chat>"], ft, w + 0.5), "--to",
            model("new", list(reversed(vocab)) + ["newtok"], new, w - 0.5), "-q"]  # fmt: skip
    for device, budget in (("cpu", "1GiB"), ("torch-cpu", "4KiB")):
        out = str(tmp_path / device)
        result = CliRunner().invoke(cli, [*args, "-o", out, "--device", device, "--max-memory", budget])
        assert result.exit_code == 0, result.output
    _same_files(tmp_path / "cpu", tmp_path / "torch-cpu")
    assert len(uploads) >= 2 * 3  # several chunks of whole rows, three inputs each


class _Streams:
    """A recording stand-in for ``torch.cuda``'s streams and events: the ordering a CUDA run would
    get, checked on CPU tensors (the copies themselves run synchronously here)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.current = _Stream(self, "default")

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        return _Stream(self, f"s{len(self.log)}-{id(self)}")

    def Event(self):  # noqa: N802
        return _Event(self)

    def current_stream(self, device):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        self.log.append(("enter", s))
        try:
            yield
        finally:
            self.current = prev


class _Stream:
    def __init__(self, api: _Streams, name: str) -> None:
        self.api, self.name = api, name

    def wait_event(self, event) -> None:
        self.api.log.append(("wait", self, event))

    def wait_stream(self, other) -> None:
        self.api.log.append(("wait_stream", self, other))


class _Event:
    def __init__(self, api: _Streams) -> None:
        self.api = api

    def record(self, stream) -> None:
        self.api.log.append(("record", self, stream))

    def synchronize(self) -> None:
        self.api.log.append(("sync", self))


def test_stream_protocol_of_the_two_staging_slots():
    """With CUDA's ordering recorded: a host slot is refilled only after the copy out of it has
    finished; a device slot is overwritten only after the compute that read it (two chunks back)
    is done, not the chunk in between (that is the overlap); compute waits for each copy."""
    api = _Streams()
    ws = resident.DeviceWorkspace("cpu", streams=api)
    log = api.log
    copy_at, decode_at, staged_at = {}, {}, {}
    with ws.activate():
        compute = api.current
        for k in range(6):
            raw = ws.staging("raw0", (8,), np.uint16)
            staged_at[k] = len(log)
            raw[:] = np.arange(8, dtype=np.uint16) + 1000 * k
            dev = ws.upload(raw)
            copy_at[k] = next(i for i in range(len(log) - 1, -1, -1) if log[i] == ("enter", ws.copy))
            log.append(("decode", k))  # the kernel that reads the device slot, on the compute stream
            decode_at[k] = len(log) - 1
            assert np.array_equal(ws.to_host(dev).view(np.uint16), raw)

    def recorded_at(event) -> int:
        return max(i for i, e in enumerate(log) if e[0] == "record" and e[1] is event)

    for k in range(6):
        # the copy is recorded on the copy stream and the compute stream waits for it before decoding
        copied = log[copy_at[k] + 1]
        assert copied[0] == "record" and copied[2] is ws.copy
        assert ("wait", compute, copied[1]) in log[copy_at[k] : decode_at[k]]
        before = log[decode_at[k - 1] if k else 0 : copy_at[k]]
        if k < 2:  # a new device buffer: wait for everything the compute stream had queued
            assert ("wait_stream", ws.copy, compute) in before
            continue
        # device slot k % 2: the copy waits for an event recorded on compute after decode k-2 ...
        waits = [e[2] for e in before if e[0] == "wait" and e[1] is ws.copy]
        assert len(waits) == 1 and log[recorded_at(waits[0])][2] is compute
        assert decode_at[k - 2] < recorded_at(waits[0]) < decode_at[k - 1]  # ... not after k-1
        # host slot k % 2 was handed out again only after the copy out of it (chunk k-2) finished
        host_copied = log[copy_at[k - 2] + 1][1]
        assert ("sync", host_copied) in log[decode_at[k - 1] : staged_at[k]]
