"""Hub options of the writing commands (``--push-to-hub``) and the ``surgery push`` command.

Only click is imported here; huggingface_hub is imported when something is actually pushed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click


def _repo_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check OWNER/NAME before any work is done (a typo must not cost a whole merge)."""
    from surgery.hub import parse_hub_id

    if value is None:
        return None
    ref = parse_hub_id(value)
    if ref is None or ref.revision is not None:
        raise click.BadParameter(
            f"{value!r} is not a Hub model repo id: write OWNER/NAME (branch: --revision)"
        )
    return value


def push_options(fn):
    """``--push-to-hub OWNER/NAME [--private] [--revision BRANCH]`` for a command that writes a checkpoint.

    The command receives ``push_to_hub``, ``private`` and ``revision``; ``--private``/``--revision`` without
    ``--push-to-hub`` is a usage error raised before the command runs.
    """

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if kwargs.get("push_to_hub") is None and (kwargs.get("private") or kwargs.get("revision")):
            raise click.UsageError("--private and --revision go with --push-to-hub OWNER/NAME")
        return fn(*args, **kwargs)

    options = [
        click.option("--push-to-hub", "push_to_hub", metavar="OWNER/NAME", default=None, callback=_repo_id,
                     help="After a successful run, upload the output folder to this Hub model repo."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("--revision", metavar="BRANCH", default=None,
                     help="With --push-to-hub: commit to this branch (created from main if missing)."),
    ]  # fmt: skip
    for option in reversed(options):
        checked = option(checked)
    return checked


def push_after_run(output: Path, push_to_hub: str | None, private: bool, revision: str | None) -> None:
    """Push ``output`` when ``--push-to-hub`` was given (call after the run succeeded, not on --dry-run)."""
    if not push_to_hub:
        return
    from surgery.hub import push

    url = push(output, push_to_hub, private=private, revision=revision)
    click.echo(f"pushed {output} to {push_to_hub}: {url}")


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="OWNER/NAME", callback=_repo_id)
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused).")
@click.option(
    "--revision", metavar="BRANCH", default=None, help="Commit to this branch (created if missing)."
)
@click.option("-m", "--message", default=None, help="Commit message [default: names the method].")
def push_command(
    folder: Path, repo_id: str, private: bool, revision: str | None, message: str | None
) -> None:
    """Upload an output FOLDER to the Hub model repo OWNER/NAME in one commit.

    The repo is created if needed. Authentication: HF_TOKEN or `hf auth login`.

    \b
    surgery push merged/ alice/my-merge --private
    """
    from surgery.hub import push

    url = push(folder, repo_id, private=private, revision=revision, commit_message=message)
    click.echo(f"pushed {folder} to {repo_id}: {url}")
