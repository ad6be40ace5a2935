"""Hub integration: the real huggingface_hub client against tests/hub/fake_hub.py (no internet).

Functions named ``child_*`` run in a fresh interpreter (see conftest.run_child) with the Hub environment
set before huggingface_hub is imported; they return JSON-able results that the tests check. This module
imports nothing heavy (not even pytest) at import time: every child imports it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fake_hub import TEST_TOKEN

ROOT = Path(__file__).resolve().parents[2]
JUNK = ("pytorch_model.bin", "consolidated.safetensors", "sub/model.safetensors", "optimizer.pt", "notes.txt")


# -- helpers (this process; the fixtures are in conftest.py) -------------------------------------------
def _seed(hub, family) -> None:
    """alice/base (with files surgery must not download), alice/ft1 (+ branch v2 = ft2), alice/ft2,
    alice/sharded (+ a consolidated.safetensors beside the index)."""
    junk = {name: b"not needed " * 50 for name in JUNK}
    hub.add_repo("alice/base", {**_files(family["base"]), **junk})
    hub.add_repo("alice/ft1", family["ft1"])
    hub.add_repo("alice/ft1", family["ft2"], branch="v2")
    hub.add_repo("alice/ft2", family["ft2"])
    hub.add_repo("alice/sharded", {**_files(family["sharded"]), "consolidated.safetensors": b"x" * 4096})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- tests --------------------------------------------------------------------------------------------
def test_parse_hub_id_and_local_paths_win(tmp_path, monkeypatch):
    from surgery.hub import HubRef, hub_ref, parse_hub_id, resolve

    assert parse_hub_id("alice/model") == HubRef("alice/model")
    assert parse_hub_id("alice/model@v1.0") == HubRef("alice/model", "v1.0")
    assert parse_hub_id("alice/model@refs/pr/3") == HubRef("alice/model", "refs/pr/3")
    for not_an_id in ("model", "/abs/path", "./rel/path", "a/b/c", "a--b/c", "a/b.git", "a/b@", "~/x"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alice" / "model").mkdir(parents=True)
    assert hub_ref("alice/model") is None  # an existing local path wins
    assert resolve("alice/model") == Path("alice/model")
    assert resolve("./missing/dir") == Path("./missing/dir")  # open_checkpoint reports it
    assert resolve(Path("other/model")) == Path("other/model")  # a Path is never a repo id


def test_push_options_check_before_running():
    import click
    from click.testing import CliRunner
    from surgery_cli.hub import push_options

    seen = {}

    @click.command()
    @push_options
    def cmd(**kwargs):
        seen.update(kwargs)

    assert (
        CliRunner().invoke(cmd, ["--push-to-hub", "alice/x", "--private", "--revision", "dev"]).exit_code == 0
    )
    assert seen == {"push_to_hub": "alice/x", "private": True, "revision": "dev"}
    result = CliRunner().invoke(cmd, ["--private"])
    assert result.exit_code == 2 and "--private and --revision go with --push-to-hub" in result.output
    result = CliRunner().invoke(cmd, ["--push-to-hub", "not a repo"])
    assert result.exit_code == 2 and "is not a Hub model repo id" in result.output


def test_push_output_folder(tmp_path, family, fake_hub, run_child):
    """A merge output pushed in one commit (first LFS upload answers 500: the client retries)."""
    fake_hub.faults["upload_500"] = 1
    out = tmp_path / "merged"
    result = run_child(
        "child_merge_and_push", family["base"], family["ft1"], family["ft2"], out, "alice/merged"
    )
    repo = fake_hub.repos["alice/merged"]
    assert repo.private
    assert len(repo.history) == 2  # the repo's initial commit + ONE upload commit
    assert "task_arithmetic" in repo.commits[repo.history[-1]].message
    stored = fake_hub.files("alice/merged")
    local = _files(out)
    assert set(local) <= set(stored) and all(stored[name] == data for name, data in local.items())
    assert "model.safetensors" in fake_hub.repos["alice/merged"].at("main").lfs
    assert fake_hub.faults["upload_500"] == 0 and len(fake_hub.requests("PUT")) == 2  # 500, then the retry
    assert fake_hub.yaml_checked == [local["README.md"].decode()]  # the client validated the card first
    assert result["url"].endswith(f"/alice/merged/commit/{repo.history[-1]}")
    # The card: valid for huggingface_hub, local inputs listed in the body (not as base_model).
    card = result["card"]
    assert card["base_model"] is None and card["license"] == "apache-2.0"
    assert card["tags"] == ["model-surgery", "merge", "task_arithmetic"]
    assert str(family["ft1"]) in card["text"] and "local path, not on the Hub" in card["text"]
    for data in stored.values():
        assert TEST_TOKEN.encode() not in data


def test_resolve_downloads_only_needed_files_and_merges(tmp_path, family, fake_hub, run_child):
    _seed(fake_hub, family)
    result = run_child("child_resolve_and_merge", tmp_path, family["base"], family["ft1"], family["ft2"])
    assert result["same_merge"], "merging resolved Hub ids differs from merging the local folders"
    assert result["files"]["alice/base"] == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert result["files"]["alice/sharded"] == [
        "README.md", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]  # fmt: skip
    for repo_id, files in result["bytes"].items():
        expected = fake_hub.files(*repo_id.split("@")) if "@" in repo_id else fake_hub.files(repo_id)
        assert all(expected[name] == bytes.fromhex(data) for name, data in files.items()), repo_id
    assert (
        result["bytes"]["alice/ft1@v2"]["model.safetensors"]
        == (family["ft2"] / "model.safetensors").read_bytes().hex()
    )
    fetched = [p for p in fake_hub.requests("GET") if "/resolve/" in p]
    assert fetched and not [p for p in fetched if p.endswith(JUNK)], fetched
    # Cards: Hub inputs become base_model (without @revision); licenses propagate only when all agree.
    hub_card, mixed_card = result["hub_card"], result["mixed_card"]
    assert hub_card["base_model"] == ["alice/base", "alice/ft1", "alice/ft2"]
    assert hub_card["base_model_relation"] == "merge" and hub_card["license"] == "apache-2.0"
    assert "at revision `main`" in hub_card["text"]
    assert mixed_card["base_model"] == ["alice/base"] and mixed_card["license"] is None
    assert "/nowhere/local-model` (local path, not on the Hub)" in mixed_card["text"]
    assert "do not all declare the same license" in mixed_card["text"]


def test_hub_errors_are_clear(tmp_path, family, fake_hub, run_child):
    _seed(fake_hub, family)
    fake_hub.add_repo("bob/private", family["ft1"], private=True)
    fake_hub.add_repo("bob/gated", family["ft1"], gated=True)
    fake_hub.add_repo("alice/bin-only", {"pytorch_model.bin": b"pickle", "config.json": b"{}"})
    errors = run_child("child_errors", family["ft1"])
    kind, message, hint = errors["alice/missing"]
    assert kind == "InputNotFoundError" and "the Hub has no model repo alice/missing" in message
    assert "HF_TOKEN" in hint
    kind, message, hint = errors["alice/base@nope"]
    assert kind == "InputNotFoundError" and "has no revision 'nope'" in message
    kind, message, hint = errors["bob/private"]
    assert kind == "InputNotFoundError" and "refused access to bob/private (HTTP 401)" in message
    kind, message, hint = errors["bob/gated"]
    assert (
        kind == "InputNotFoundError" and "bob/gated is gated" in message and "accept its conditions" in hint
    )
    kind, message, hint = errors["alice/bin-only"]
    assert kind == "InputNotFoundError" and "alice/bin-only has no safetensors weights" in message
    kind, message, hint = errors["push bob/theirs"]
    assert kind == "OutputError" and "no write access to bob/theirs (HTTP 403" in message
    kind, message, hint = errors["push partial"]
    assert kind == "OutputError" and "holds an unfinished run" in message
    assert errors["push alice/new"][0] == "no error" and "alice/new" in fake_hub.repos
    fake_hub.faults["reject_token"] = True  # an invalid or revoked token
    errors = run_child("child_errors", family["ft1"])
    kind, message, hint = errors["push alice/new"]
    assert kind == "OutputError" and "rejected the token" in message and "HTTP 401" in message
    assert "write access" in hint
    kind, message, hint = errors["alice/missing"]
    assert "HTTP 401" in message


def test_offline_and_no_network(tmp_path, family, fake_hub, run_child, closed_port_url):
    _seed(fake_hub, family)
    online = run_child("child_resolve", "alice/base")
    assert online["ok"]
    offline = run_child("child_resolve", "alice/base", "alice/ft1", env={"HF_HUB_OFFLINE": "1"})
    assert offline["alice/base"] == online["alice/base"]  # the cached copy, no request made
    kind, message, hint = offline["alice/ft1"]
    assert kind == "InputNotFoundError" and "HF_HUB_OFFLINE is set while the" in message
    assert "unset HF_HUB_OFFLINE" in hint
    gone = run_child("child_resolve", "alice/base", "alice/ft1", env={"HF_ENDPOINT": closed_port_url})
    assert gone["alice/base"] == online["alice/base"]  # no network: the cache still serves it
    kind, message, hint = gone["alice/ft1"]
    assert message.startswith("checkpoint not found: alice/ft1 is not a local path, and it could not be")
    assert (
        kind == "InputNotFoundError"
        and "nor found in the Hugging Face cache" in message
        and "network" in hint
    )
    kind, message, hint = gone["push"]
    assert kind == "OutputError" and "could not reach the Hub" in message


def test_dropped_connection_leaves_no_corrupt_file(tmp_path, family, fake_hub, run_child):
    """The connection drops on every try of one download (a clear error, nothing partial cached), then on
    the first try of the next one only (the client's retry completes it, byte-identical)."""
    _seed(fake_hub, family)
    tries = 6  # huggingface_hub 2.4 tries a file download 6 times
    fake_hub.faults.update(drop={"model.safetensors": tries + 1}, drop_after=1000)
    result = run_child("child_drop", "alice/ft2")
    kind, message, hint = result["failure"]
    assert (
        kind == "InputNotFoundError"
        and "alice/ft2 is not a local path, and it could not be" in message
        and "re-running" in hint
    )
    assert result["incomplete"] == [] and "model.safetensors" not in result["snapshot"]
    assert bytes.fromhex(result["weights"]) == (family["ft2"] / "model.safetensors").read_bytes()
    gets = [p for p in fake_hub.requests("GET") if p.endswith("/model.safetensors")]
    assert len(gets) == tries + 2 and fake_hub.faults["drop"]["model.safetensors"] == 0


def test_push_command(tmp_path, family, fake_hub, run_child):
    out = tmp_path / "out"
    shutil.copytree(family["ft1"], out)
    result = run_child("child_push_command", out)
    assert result["ok"] == [0, ""] and "pushed" in result["ok_output"]
    assert fake_hub.files("alice/cli", "dev")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "model.safetensors" not in fake_hub.files("alice/cli", "main")  # only the branch got it
    repo = fake_hub.repos["alice/cli"]
    assert repo.commits[repo.branches["dev"]].message == "my message"
    assert result["bad_id"][0] == 2 and "is not a Hub model repo id" in result["bad_id"][1]


def test_cli_merges_hub_ids_and_pushes(tmp_path, family, fake_hub, run_child):
    _seed(fake_hub, family)
    out, from_cards = tmp_path / "merged", tmp_path / "from_cards"
    result = run_child("child_cli", out, from_cards)
    for args, (code, output) in result.items():
        assert code == 0, (args, output)
    assert "pushed" not in result["dry-run"][1] and "alice/dry" not in fake_hub.repos
    stored = fake_hub.files("alice/merged")
    assert all(stored[p.name] == p.read_bytes() for p in out.iterdir() if p.is_file())
    card = stored["README.md"].decode()
    assert "base_model:\n- alice/sharded\n- alice/ft1\n- alice/ft2\n" in card
    assert "- alice/ft1\n" in stored["surgery_recipe.yaml"].decode()  # the recipe names the Hub ids
    # No --base: the fine-tunes' cards name alice/base, a Hub id, which is downloaded too.
    assert "base: alice/base\n" in (from_cards / "surgery_recipe.yaml").read_text()
    assert fake_hub.files("alice/again", "dev")["README.md"] == (from_cards / "README.md").read_bytes()


# -- children (run in a fresh interpreter with the Hub environment) -----------------------------------
def _card_of(text: str) -> dict:
    from huggingface_hub import ModelCard

    data = ModelCard(text).data
    return {
        "base_model": data.base_model,
        "base_model_relation": data.get("base_model_relation"),
        "license": data.license,
        "tags": data.tags,
        "text": text,
    }


def _merge(base: str, models: list[str], out: str) -> Path:
    from surgery.engine import merge
    from surgery.recipe import make_recipe

    merge(make_recipe("task_arithmetic", models, base, {"scale": 0.5}), out)  # the library writes the card
    return Path(out)


def _failure(call) -> list[str]:
    from surgery.errors import SurgeryError

    try:
        call()
    except SurgeryError as exc:
        return [type(exc).__name__, exc.message, exc.hint or ""]
    return ["no error", "", ""]


def child_merge_and_push(base: str, ft1: str, ft2: str, out: str, repo_id: str) -> dict:
    from surgery.hub import push

    folder = _merge(base, [ft1, ft2], out)
    url = push(folder, repo_id, private=True)
    return {"url": url, "card": _card_of((folder / "README.md").read_text())}


def child_resolve_and_merge(tmp: str, base: str, ft1: str, ft2: str) -> dict:
    from surgery.card import render_card as card_text
    from surgery.hub import resolve

    ids = ["alice/base", "alice/ft1", "alice/ft2@main", "alice/ft1@v2", "alice/sharded"]
    folders = {i: resolve(i) for i in ids}
    hub_out = _merge(str(folders["alice/base"]), [str(folders["alice/ft1"]), str(folders["alice/ft2@main"])],
                     f"{tmp}/hub_merge")  # fmt: skip
    local_out = _merge(base, [ft1, ft2], f"{tmp}/local_merge")
    same = (hub_out / "model.safetensors").read_bytes() == (local_out / "model.safetensors").read_bytes()
    args = ("Task Arithmetic", "task_arithmetic", "https://arxiv.org/abs/2212.04089", "base + s * sum(tau)")
    hub_card = card_text(*args, ["alice/base", "alice/ft1@main", "alice/ft2"], "method: x\n", {"scale": 0.5})
    mixed_card = card_text(*args, ["alice/base", "/nowhere/local-model"], "method: x\n", {"scale": 0.5})
    return {
        "same_merge": same,
        "files": {i: sorted(p.name for p in f.iterdir()) for i, f in folders.items()},
        "bytes": {i: {p.name: p.read_bytes().hex() for p in f.iterdir()} for i, f in folders.items()},
        "hub_card": _card_of(hub_card),
        "mixed_card": _card_of(mixed_card),
    }


def child_errors(ft1: str) -> dict:
    from surgery.hub import push, resolve

    partial = Path(ft1).parent / "partial"
    shutil.copytree(ft1, partial, dirs_exist_ok=True)
    (partial / ".surgery-partial").mkdir(exist_ok=True)
    out = {
        s: _failure(lambda s=s: resolve(s))
        for s in ("alice/missing", "alice/base@nope", "bob/private", "bob/gated", "alice/bin-only")
    }
    out["push bob/theirs"] = _failure(lambda: push(ft1, "bob/theirs"))
    out["push partial"] = _failure(lambda: push(partial, "alice/partial"))
    out["push alice/new"] = _failure(lambda: push(ft1, "alice/new"))
    return out


def child_resolve(*sources: str) -> dict:
    from surgery.hub import push, resolve

    out: dict = {}
    for source in sources:
        try:
            folder = resolve(source)
        except Exception:
            out[source] = _failure(lambda source=source: resolve(source))
            continue
        out[source] = str(folder)
        out["ok"] = True
        out["weights"] = (folder / "model.safetensors").read_bytes().hex()
    if len(sources) > 1 and str(out.get(sources[0], "")).startswith("/"):
        out["push"] = _failure(lambda: push(out[sources[0]], "alice/pushed"))
    return out


def child_drop(source: str) -> dict:
    """Resolve ``source`` twice: report the first failure and the cache after it, then the weights."""
    import time

    from huggingface_hub import constants

    from surgery.hub import resolve

    time.sleep = lambda seconds: None  # the client waits a second between tries: not what is tested
    cache = Path(constants.HF_HUB_CACHE)
    out = {"failure": _failure(lambda: resolve(source))}
    out["incomplete"] = sorted(p.name for p in cache.rglob("*.incomplete"))
    out["snapshot"] = sorted(p.name for p in cache.glob("models--*/snapshots/*/*"))
    out["weights"] = (resolve(source) / "model.safetensors").read_bytes().hex()
    return out


def child_push_command(folder: str) -> dict:
    from click.testing import CliRunner
    from surgery_cli.hub import push_command

    ok = CliRunner().invoke(push_command, [folder, "alice/cli", "--revision", "dev", "-m", "my message"])
    bad = CliRunner().invoke(push_command, [folder, "alice/cli@dev"])
    return {"ok": [ok.exit_code, repr(ok.exception) if ok.exception else ""], "ok_output": ok.output,
            "bad_id": [bad.exit_code, bad.output]}  # fmt: skip


def child_cli(out: str, from_cards: str) -> dict:
    from click.testing import CliRunner
    from surgery_cli.main import cli

    runs = {
        "merge": ["merge", "alice/ft1", "alice/ft2", "--base", "alice/sharded", "-o", out, "--push-to-hub",
                  "alice/merged", "-q"],
        "dry-run": ["merge", "alice/ft1", "alice/ft2", "--base", "alice/sharded", "-o", f"{out}-dry",
                    "--dry-run", "--push-to-hub", "alice/dry"],
        "from cards": ["merge", "alice/ft1", "alice/ft2@main", "-o", from_cards, "-q"],
        "push": ["push", from_cards, "alice/again", "--revision", "dev"],
    }  # fmt: skip
    out = {}
    for name, args in runs.items():
        result = CliRunner().invoke(cli, args)
        out[name] = [result.exit_code, result.output + (repr(result.exception) if result.exception else "")]
    return out


def child_merge_adapters(tmp: str, local_adapter: str) -> dict:
    """`surgery merge alice/lora` (base from the adapter's config) vs the local adapter and base."""
    from click.testing import CliRunner
    from surgery_cli.main import cli

    from surgery.hub import resolve

    runner = CliRunner()
    hub = runner.invoke(cli, ["merge", "alice/lora", "--scale", "0.5", "-o", f"{tmp}/hub", "-q"])
    assert hub.exit_code == 0, hub.output
    local = runner.invoke(cli, ["merge", local_adapter, "--scale", "0.5", "-o", f"{tmp}/out_local", "-q"])
    assert local.exit_code == 0, local.output
    same = (
        Path(f"{tmp}/hub/model.safetensors").read_bytes()
        == Path(f"{tmp}/out_local/model.safetensors").read_bytes()
    )
    return {
        "same": same,
        "files": sorted(p.name for p in resolve("alice/lora").iterdir()),
        "recipe": Path(f"{tmp}/hub/surgery_recipe.yaml").read_text(),
    }


def test_dropped_download_resumes_by_range(tmp_path, family, fake_hub, run_child):
    """A connection that drops mid-file is resumed from the last chunk written (HTTP Range), not
    restarted, and the file is byte-identical. huggingface_hub's own retry does the resuming; surgery
    makes its chunks small (here 256 bytes, 1 MiB in real runs) so a drop loses little."""
    _seed(fake_hub, family)
    fake_hub.faults.update(drop={"model.safetensors": 1}, drop_after=1024 + 100)
    result = run_child("child_drop_small_chunks", "alice/ft2")
    assert result["failure"] == ["no error", "", ""]
    assert bytes.fromhex(result["weights"]) == (family["ft2"] / "model.safetensors").read_bytes()
    gets = [r for p, r in fake_hub.ranges if p == "model.safetensors"]
    assert gets == [None, "bytes=1024-"], gets  # 4 whole chunks kept, the remaining bytes requested


def child_drop_small_chunks(source: str) -> dict:
    import time

    import surgery.hub

    time.sleep = lambda seconds: None  # the client waits a second between tries: not what is tested
    surgery.hub.RESUME_CHUNK = 256
    out = {"failure": _failure(lambda: surgery.hub.resolve(source))}
    out["weights"] = (surgery.hub.resolve(source) / "model.safetensors").read_bytes().hex()
    return out
