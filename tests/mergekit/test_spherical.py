"""mergekit's spherical means and NearSwap, run from mergekit configs, against their math written out
on whole tensors (torch, float64) from mergekit 0.1.5's definitions."""

from __future__ import annotations

import math

import pytest
import torch

from tests.mergekit.test_run_mergekit import check, family, states_of, write_config  # noqa: F401


def run(invoke, tmp_path, data):
    cfg = write_config(tmp_path, data)
    result = invoke("run", cfg, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


def nuslerp(t, v0, v1):
    a, b = v0.flatten().double(), v1.flatten().double()
    ua, ub = a / a.norm().clamp(min=1e-7), b / b.norm().clamp(min=1e-7)
    cos = float((ua * ub).sum().clamp(-1, 1))
    if 1 - cos * cos <= 1e-16:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    th = math.acos(cos)
    return ((math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)).reshape(v0.shape)


def multislerp(xs, w, eps=1e-8):
    x = torch.stack([v.flatten().double() for v in xs])
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum()
    norms = x.norm(dim=1, keepdim=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((u - (u @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    out = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms.squeeze(1) * w).sum()
    return out.reshape(xs[0].shape)


def karcher(xs, max_iter=10, tol=1e-5):
    x = [v.flatten().double() for v in xs]
    a = 1.0 / len(x)
    norms = [v.norm() for v in x]
    units = [v / n for v, n in zip(x, norms)]
    mean = sum(a * u for u in units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = float(torch.dot(mean, u).clamp(-1, 1))
            th = math.acos(dot)
            if th < tol:
                continue
            tangent += a * (th / math.sin(th)) * (u - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(a * n for n in norms) * mean).reshape(xs[0].shape)


def test_nuslerp_of_task_vectors(family, invoke, tmp_path):  # noqa: F811
    out = run(invoke, tmp_path, {
        "merge_method": "nuslerp", "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 0.3}},
                   {"model": str(family["ft2"]), "parameters": {"weight": 0.9}}],
    })  # fmt: skip
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")
    check(out, lambda n, _: (b[n].double() + nuslerp(0.75, f1[n] - b[n], f2[n] - b[n])).float())


def test_multislerp_with_a_base(family, invoke, tmp_path):  # noqa: F811
    w = [1.0, 2.0, 0.5]
    out = run(invoke, tmp_path, {
        "merge_method": "multislerp", "base_model": str(family["base"]),
        "models": [{"model": str(family[k]), "parameters": {"weight": x}} for k, x in zip(("ft1", "ft2", "ft3"), w)],
    })  # fmt: skip
    b, *fs = states_of(family, "base", "ft1", "ft2", "ft3")
    check(out, lambda n, _: (b[n].double() + multislerp([f[n] - b[n] for f in fs], w)).float())


def test_karcher_averages_every_input_the_base_included(family, invoke, tmp_path):  # noqa: F811
    out = run(invoke, tmp_path, {
        "merge_method": "karcher", "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"])}, {"model": str(family["ft2"])}],
    })  # fmt: skip
    b, f1, f2 = states_of(family, "base", "ft1", "ft2")
    check(out, lambda n, _: karcher([f1[n], f2[n], b[n]]).float())


def test_nearswap(family, invoke, tmp_path):  # noqa: F811
    out = run(invoke, tmp_path, {
        "merge_method": "nearswap", "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"])}], "parameters": {"t": 0.01},
    })  # fmt: skip
    b, f1 = states_of(family, "base", "ft1")

    def expect(n, _):
        w = (0.01 / (b[n] - f1[n]).abs().clamp(min=1e-6)).clamp(0, 1)
        return w * f1[n] + (1 - w) * b[n]

    check(out, expect)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher"])
def test_streamed_equals_whole(family, invoke, tmp_path, method):  # noqa: F811
    models = [{"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")]
    cfg = write_config(tmp_path, {"merge_method": method, "models": models})
    a = invoke("run", cfg, "-o", tmp_path / "a", "-q")
    c = invoke("run", cfg, "-o", tmp_path / "c", "-q", "--max-memory", "4KiB", "--threads", "3")
    assert a.exit_code == 0 and c.exit_code == 0, a.output + c.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "c" / "model.safetensors"
    ).read_bytes()
