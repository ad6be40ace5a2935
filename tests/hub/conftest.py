"""Hub tests: a fake Hub server in this process, the real huggingface_hub client in child processes.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is imported,
and other test files import transformers (which imports huggingface_hub) with the real environment. So
every scenario that uses the client runs in a fresh interpreter whose environment is set before anything
is imported: ``run_child("child_name", arg, ...)`` calls ``test_hub.child_name(arg, ...)`` there and
returns what it returned (JSON). Every child's output is checked for the token.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fake_hub import TEST_TOKEN, FakeHub

BASE_CARD = "---\nlicense: apache-2.0\n---\n\n# a base\n"
FT_CARD = "---\nlicense: apache-2.0\nbase_model: alice/base\n---\n\n# a fine-tune\n"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULT = "@@child-result@@"


def _child_code(module: str) -> str:
    return (
        f"import json, sys, {module}; "
        f"print({RESULT!r} + json.dumps(getattr({module}, sys.argv[1])(*json.loads(sys.argv[2]))))"
    )


@pytest.fixture
def fake_hub():
    hub = FakeHub(TEST_TOKEN).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(tmp_path, fake_hub) -> dict[str, str]:
    """The environment of a child: the fake endpoint, a fresh HF_HOME, Xet off, a fake token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(
        HF_ENDPOINT=fake_hub.url,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_TOKEN=TEST_TOKEN,
        NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "numba-cache")),
        # the parent's path too: it may map surgery_cli to this tree's cli/ (a worktree's shim)
        PYTHONPATH=os.pathsep.join(
            [str(HERE), str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    )
    return env


def _child_runner(hub_env: dict, module: str, timeout: float):
    """``run(name, *args, env=None)`` -> what ``<module>.<name>(*args)`` returned in a fresh process."""

    def run(name: str, *args, env: dict | None = None):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _child_code(module),
                name,
                json.dumps([str(a) if isinstance(a, Path) else a for a in args]),
            ],
            env={**hub_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        assert TEST_TOKEN not in output, f"the token leaked into the output of {name}"
        assert proc.returncode == 0, f"{name} failed:\n{output[-6000:]}"
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)][-1]
        return json.loads(line[len(RESULT) :])

    return run


@pytest.fixture
def run_child(hub_env):
    """``run_child(name, *args, env=None)`` -> what ``test_hub.<name>(*args)`` returned in a fresh process."""
    return _child_runner(hub_env, "test_hub", timeout=120)


@pytest.fixture
def child_runner(hub_env):
    """``child_runner(module, timeout)``: a ``run_child`` for the functions of another test module."""
    return lambda module, timeout: _child_runner(hub_env, module, timeout)


@pytest.fixture
def family(tmp_path) -> dict[str, Path]:
    """Local base + two fine-tunes (single files) and a sharded copy of the base; cards with a license."""
    from ckpt_factory import make_family

    base, models = make_family(tmp_path / "local", n_models=2)
    (base / "README.md").write_text(BASE_CARD)
    for folder in models:
        (folder / "README.md").write_text(FT_CARD)
    (base / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    sharded = tmp_path / "local" / "sharded"
    _shard(base, sharded)
    return {"base": base, "ft1": models[0], "ft2": models[1], "sharded": sharded}


def _shard(src: Path, dst: Path) -> None:
    """``src``'s tensors in two shards with an index (as save_pretrained writes them)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    dst.mkdir(parents=True)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "README.md"):
        shutil.copy(src / name, dst / name)


@pytest.fixture
def closed_port_url() -> str:
    """A local URL nobody listens on (connections are refused: no network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
