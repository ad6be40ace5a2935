"""The Hugging Face Hub: resolve ``owner/name[@revision]`` to a folder, push an output folder, write cards.

Resolving downloads only what surgery reads (the safetensors weights the index names, the index, config,
tokenizer files, generation config, chat template, model card and ``surgery_diff.json``) into the shared
Hugging Face cache, through ``huggingface_hub``: ``HF_HOME``, ``HF_TOKEN``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` mean what they mean everywhere else. An existing local path always wins over a repo id.

Pushing creates the repo if needed and uploads the folder in ONE commit (``create_commit``): a reader never
sees a half-uploaded checkpoint. The token is never printed, logged or stored: errors are scrubbed of it.

``huggingface_hub`` is imported inside the functions that need it, so ``surgery --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import InputNotFoundError, OutputError, SurgeryError
from surgery.files import ADAPTER_CONFIG, CARD, CONFIG, INDEX, MANIFEST, RECIPE, SIDE_FILES, SINGLE, STAGING

# Read beside the weights, with the tokenizer and chat-template files of SIDE_FILES (and a LoRA
# adapter's config, whose weights file is then the only top-level safetensors file).
EXTRA_FILES = (CONFIG, INDEX, CARD, MANIFEST, ADAPTER_CONFIG)
_PART = r"[\w](?:[\w.-]{0,94}[\w])?"  # a namespace or name, as huggingface_hub.utils.validate_repo_id
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^\s@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# huggingface_hub resumes a download that drops mid-file with an HTTP Range request from the bytes it
# has written, but it writes in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB) and loses the partial chunk on
# a drop: smaller chunks make its resume lose at most this much (the per-chunk cost is negligible).
RESUME_CHUNK = 1 << 20


@dataclass(frozen=True)
class HubRef:
    """A model repo on the Hub and an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(source: str | os.PathLike) -> HubRef | None:
    """``owner/name`` or ``owner/name@revision`` -> HubRef; None for anything else (paths included)."""
    m = _HUB_ID.fullmatch(str(source))
    if m is None or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith(".git"):
        return None
    return HubRef(m["repo"], m["revision"])


def hub_ref(source: str | os.PathLike) -> HubRef | None:
    """The repo a checkpoint source names, or None when it is a local path (existing paths win)."""
    if Path(source).expanduser().exists():
        return None
    return parse_hub_id(source)


def resolve(source: str | os.PathLike) -> Path:
    """A local folder (or file) holding ``source``: local paths as they are, Hub ids downloaded.

    Only a string can name a Hub repo (a ``Path`` is a path). A Hub id that cannot be downloaded raises
    InputNotFoundError saying why: no such repo or revision, a private or gated repo, no network, or
    ``HF_HUB_OFFLINE`` with nothing cached.
    """
    path = Path(source).expanduser()
    ref = None if path.exists() or not isinstance(source, str) else parse_hub_id(source)
    if ref is None:
        return path  # open_checkpoint reports a missing path
    return download(ref)


def download(ref: HubRef) -> Path:
    """Fetch a repo's small files, then only the weights they call for; return the snapshot folder."""
    try:
        import huggingface_hub as hf
    except ImportError:
        raise InputNotFoundError(
            f"checkpoint not found: {ref} is not a local path, and huggingface_hub is not installed to "
            "download it from the Hub",
            hint="pip install huggingface_hub",
            path=str(ref),
        ) from None
    from huggingface_hub.utils import validate_repo_id

    offline = _offline()
    try:
        validate_repo_id(ref.repo_id)
        small = sorted(set(EXTRA_FILES) | set(SIDE_FILES))
        folder = Path(
            hf.snapshot_download(
                ref.repo_id, revision=ref.revision, allow_patterns=small, local_files_only=offline
            )
        )
        # The snapshot folder is named after the commit: pin it, so the weights match the small files.
        commit = folder.name if _COMMIT.fullmatch(folder.name) else ref.revision
        weights, ignore = _weight_files(hf, ref, folder, commit)
        hf.constants.DOWNLOAD_CHUNK_SIZE = min(hf.constants.DOWNLOAD_CHUNK_SIZE, RESUME_CHUNK)
        hf.snapshot_download(
            ref.repo_id,
            revision=commit,
            allow_patterns=weights,
            ignore_patterns=ignore,
            local_files_only=offline,
        )
    except Exception as exc:
        if not _hub_failure(exc):
            raise
        raise _download_error(exc, ref, offline) from None
    return folder


def stream_snapshot(ref: HubRef) -> tuple[Path, str, list[str]] | None:
    """For reading weights by range: fetch only the small files; return (their snapshot folder, the
    commit they pin, the safetensors files to read remotely). None when HF_HUB_OFFLINE is set: without
    network the weights can only come from the cache, as ``download`` finds them."""
    try:
        import huggingface_hub as hf
    except ImportError:
        return None  # download() says huggingface_hub is missing
    from huggingface_hub.utils import validate_repo_id

    if _offline():
        return None
    try:
        validate_repo_id(ref.repo_id)
        small = sorted(set(EXTRA_FILES) | set(SIDE_FILES))
        folder = Path(hf.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=small))
        commit = folder.name if _COMMIT.fullmatch(folder.name) else None
        if commit is None:  # a snapshot folder is named after its commit; anything else cannot be pinned
            commit = hf.HfApi().model_info(ref.repo_id, revision=ref.revision).sha
        weights, _ = _weight_files(hf, ref, folder, commit)
        if "*.safetensors" in weights:  # no usable index: list the top-level weights from the Hub
            tree = hf.HfApi().list_repo_files(ref.repo_id, revision=commit)
            weights = sorted(f for f in tree if f.endswith(".safetensors") and "/" not in f)
    except Exception as exc:
        if not _hub_failure(exc):
            raise
        raise _download_error(exc, ref, False) from None
    return folder, commit, weights


def _weight_files(hf, ref: HubRef, folder: Path, commit: str | None) -> tuple[list[str], list[str] | None]:
    """The safetensors files to fetch: the shards the index names, else model.safetensors, else the
    top-level ``*.safetensors`` (never ``consolidated.safetensors`` beside an index, nor subfolders)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({str(v) for v in weight_map.values()}), None
        except (ValueError, KeyError, TypeError, AttributeError):
            return ["*.safetensors"], ["*/*"]  # open_checkpoint reports the broken index
    try:
        tree = hf.get_cached_repo_tree(ref.repo_id, revision=commit)
    except Exception:  # no cached listing (older cache): take every top-level safetensors file
        return ["*.safetensors"], ["*/*"]
    names = sorted(f.path for f in tree if f.path.endswith(".safetensors") and "/" not in f.path)
    if not names:
        raise InputNotFoundError(
            f"Hub repo {ref} has no safetensors weights",
            hint="surgery reads safetensors checkpoints; convert .bin weights first "
            "(e.g. transformers' from_pretrained + save_pretrained)",
            path=str(ref),
        )
    return ([SINGLE] if SINGLE in names else names), None


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as it is set now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in {"1", "ON", "YES", "TRUE"}


# -- errors ------------------------------------------------------------------------------------------
def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _find(exc: BaseException, names: tuple[str, ...]) -> BaseException | None:
    """The first exception in the cause chain whose class (or a base class) has one of these names.

    By name, not isinstance: huggingface_hub, requests and httpx are imported only when a Hub call
    happens (and moved these classes between versions), so there may be no class to compare with."""
    for e in _chain(exc):
        if any(cls.__name__ in names for cls in type(e).__mro__):
            return e
    return None


def _status(exc: BaseException) -> int | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


_NETWORK = ("TransportError", "NetworkError", "ConnectError", "TimeoutException", "RemoteProtocolError",
            "ConnectionError", "TimeoutError")  # fmt: skip


def _hub_failure(exc: BaseException) -> bool:
    """What the client raises for the Hub, the network or the disk (programming errors propagate)."""
    if isinstance(exc, SurgeryError):
        return False
    return isinstance(exc, (OSError, ValueError, RuntimeError)) or _find(exc, ("HTTPError",)) is not None


def scrub(text: str) -> str:
    """``text`` with the Hub token (if any) replaced by ``***``: error text must never carry it."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:
        token = None
    for secret in {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if secret:
            text = text.replace(secret, "***")
    return text


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return scrub(f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _download_error(exc: Exception, ref: HubRef, offline: bool) -> SurgeryError:
    """A clear InputNotFoundError for whatever huggingface_hub raised while downloading ``ref``."""
    from huggingface_hub import constants

    repo = ref.repo_id
    status = _status(exc)
    access_hint = (
        f"for a private or gated repo, set HF_TOKEN (or `hf auth login`) to a token that can read {repo}"
    )

    def err(message: str, hint: str) -> InputNotFoundError:
        return InputNotFoundError(scrub(message), hint=scrub(hint), path=str(ref))

    if _find(exc, ("HFValidationError",)):
        return err(
            f"checkpoint not found: {ref} is neither a local path nor a valid Hub repo id",
            "name a local folder or .safetensors file, or a Hub repo as OWNER/NAME[@REVISION]",
        )
    if _find(exc, ("RevisionNotFoundError",)):
        return err(
            f"Hub repo {repo} has no revision {ref.revision!r}",
            "check the branch, tag or commit after '@' (the default is the main branch)",
        )
    if _find(exc, ("GatedRepoError",)):
        return err(
            f"Hub repo {repo} is gated and the token in use has no access to it",
            f"accept its conditions at {_endpoint()}/{repo}, then set HF_TOKEN to a token of that account",
        )
    if _find(exc, ("IncompleteSnapshotError",)):
        return err(
            f"the cached copy of {ref} is incomplete and the Hub could not be reached to finish it",
            "re-run with network access (unset HF_HUB_OFFLINE): the missing files are downloaded",
        )
    if status in (401, 403):
        return err(
            f"the Hub refused access to {repo} (HTTP {status}): it is private or gated, or the token is bad",
            access_hint,
        )
    if _find(exc, ("RepositoryNotFoundError",)) or status == 404:
        return err(
            f"checkpoint not found: {ref} is not a local path, and the Hub has no model repo {repo} "
            "(or it is private)",
            f"check the path or the repo id; {access_hint}",
        )
    if offline or _find(exc, ("OfflineModeIsEnabled",)):
        return err(
            f"checkpoint not found: {ref} is not a local path, and HF_HUB_OFFLINE is set while the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) lacks it",
            "check the path, or unset HF_HUB_OFFLINE to download it",
        )
    if isinstance(status, int) and status >= 500:
        return err(
            f"the Hub failed while downloading {ref} (HTTP {status})",
            "try again later; files already downloaded stay in the cache",
        )
    network = _find(exc, _NETWORK)
    if network is not None or _find(exc, ("LocalEntryNotFoundError",)):
        what = _reason(network) if network is not None else "no connection"
        return err(
            f"checkpoint not found: {ref} is not a local path, and it could not be downloaded from "
            f"{_endpoint()} ({what}) nor found in the Hugging Face cache",
            "check the path, or the network connection (and HF_ENDPOINT); re-running resumes a download: "
            "complete files stay cached, partial ones are discarded",
        )
    return err(f"could not download {ref} from the Hub: {_reason(exc)}", "re-run; use --debug for details")


# -- pushing -----------------------------------------------------------------------------------------
def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload every file of an output folder to model repo ``repo_id`` in one commit; return its URL.

    The repo is created when missing (private with ``private=True``; an existing public repo is refused
    then, rather than published). ``revision`` names a branch, created from main when missing.
    """
    folder = Path(folder)
    files = _files_to_push(folder)
    try:
        import huggingface_hub as hf
    except ImportError:
        raise OutputError(
            "pushing needs huggingface_hub", hint="pip install huggingface_hub", path=str(folder)
        ) from None
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise ValueError
    except ValueError:
        raise OutputError(
            f"{repo_id!r} is not a Hub model repo id", hint="write OWNER/NAME, e.g. alice/my-merge"
        ) from None
    _check_card(folder / CARD)
    if _offline():
        raise OutputError(
            f"cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE, then run `surgery push` on the folder",
            path=str(folder),
        )
    api = hf.HfApi()
    message = commit_message or _commit_message(folder)
    operations = [hf.CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise OutputError(
                f"Hub repo {repo_id} exists and is public; --private does not change an existing repo",
                hint="push to a new repo name, or make the repo private on the Hub first",
                path=str(folder),
            )
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            commit_description="Made with model-surgery; `surgery_recipe.yaml` reproduces it.",
            repo_type="model",
            revision=revision,
        )
    except Exception as exc:
        if not _hub_failure(exc):
            raise
        raise _push_error(exc, folder, repo_id) from None
    return str(getattr(info, "commit_url", None) or f"{_endpoint()}/{repo_id}")


def _files_to_push(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise OutputError(f"{folder} is not a folder", hint="name a surgery output folder", path=str(folder))
    if (folder / STAGING).exists():
        raise OutputError(
            f"{folder} holds an unfinished run, not a checkpoint",
            hint="re-run the command that writes it until it completes, then push",
            path=str(folder),
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        raise OutputError(
            f"{folder} holds no .safetensors files", hint="push a surgery output folder", path=str(folder)
        )
    return files


def _check_card(readme: Path) -> None:
    """Refuse, before uploading anything, a card the Hub would reject (base_model must be repo ids)."""
    if not readme.is_file():
        return
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    try:
        data = ModelCard(readme.read_text()).data
        bases = data.get("base_model") or []
        for base in [bases] if isinstance(bases, str) else bases:
            validate_repo_id(base)
    except Exception as exc:
        raise OutputError(
            f"the model card {readme} is not valid for the Hub: {_reason(exc)}",
            hint="base_model may list Hub repo ids only; regenerate the card or fix its front matter",
            path=str(readme),
        ) from None


def _commit_message(folder: Path) -> str:
    method = None
    recipe = folder / RECIPE
    if recipe.is_file():
        import yaml

        try:
            data = yaml.safe_load(recipe.read_text())
            method = data.get("method") if isinstance(data, dict) else None
        except yaml.YAMLError:
            method = None
    return f"Upload {method} output of model-surgery" if method else "Upload a model-surgery checkpoint"


def _push_error(exc: Exception, folder: Path, repo_id: str) -> OutputError:
    status = _status(exc)
    retry = f"re-run `surgery push {folder} {repo_id}` (files already uploaded are not sent again)"

    def err(message: str, hint: str) -> OutputError:
        return OutputError(scrub(message), hint=scrub(hint), path=str(folder))

    if status == 401:
        return err(
            f"the Hub rejected the token while pushing to {repo_id} (HTTP 401 Unauthorized)",
            "set HF_TOKEN (or run `hf auth login`) with a token that has write access",
        )
    if status == 403:
        return err(
            f"no write access to {repo_id} (HTTP 403 Forbidden)",
            "use a token with write access to that user or organization, or push to your own namespace",
        )
    if _find(exc, ("RevisionNotFoundError",)) or _find(exc, ("RepositoryNotFoundError",)):
        return err(f"could not push to {repo_id}: {_reason(exc)}", "check the repo id and --revision")
    if isinstance(exc, ValueError) and "metadata" in str(exc):
        return err(f"the Hub refused the model card in {folder}: {_reason(exc)}", "fix README.md's metadata")
    if isinstance(status, int) and status >= 500:
        return err(f"the Hub failed while pushing to {repo_id} (HTTP {status})", f"try again later: {retry}")
    network = _find(exc, _NETWORK)
    if network is not None:
        return err(f"could not reach the Hub at {_endpoint()} to push {repo_id} ({_reason(network)})", retry)
    return err(f"pushing to {repo_id} failed: {_reason(exc)}", retry)
