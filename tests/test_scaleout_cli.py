"""The static split from the command line: two `surgery merge ... --shards I/2` processes at once, then
`surgery finalize OUT`, give the folder a single `surgery merge` writes (card included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ckpt_factory import make_family


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_then_finalize_equals_one_process(tmp_path, invoke):
    base, models = make_family(tmp_path / "family", n_models=2, dtype="BF16", quantize=True)
    args = ["merge", *map(str, models), "--base", str(base), "--ties", "--density", "0.3",
            "--granularity", "global", "--lines", "--max-shard-size", "1000", "-q"]  # fmt: skip
    single = invoke(*args, "-o", tmp_path / "single")
    assert single.exit_code == 0, single.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-m", "surgery_cli.main"]
    shares = [
        subprocess.Popen([*cmd, *args, "-o", str(tmp_path / "split"), "--shards", f"{i}/2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in shares]
    assert [p.returncode for p in shares] == [0, 0], outputs
    assert all("surgery finalize" in o for o in outputs)
    early = invoke("finalize", tmp_path / "nothing")
    assert early.exit_code == 1 and "holds no split run" in early.output
    done = invoke("finalize", tmp_path / "split")
    assert done.exit_code == 0, done.output
    assert _files(tmp_path / "split") == _files(tmp_path / "single")
    both = invoke(*args, "-o", tmp_path / "x", "--shards", "0/2", "--ray", "local")
    assert both.exit_code == 1 and "choose one" in both.output
    bad = invoke(*args, "-o", tmp_path / "y", "--shards", "2/2")
    assert bad.exit_code == 1 and "hint:" in bad.output
