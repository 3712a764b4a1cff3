"""The Hugging Face Hub: what a hub id looks like, offline mode, hub errors in words, and `peftkit push`.

Model downloads (models.py), dataset loads (data/readers.py) and uploads (push_adapter) share this
module, so a gated repo, a missing token or a dead network reads the same wherever it happens.
No torch here; huggingface_hub, datasets and the registry are imported where they are used.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from peftkit.errors import PeftkitError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LOGIN = "set HF_TOKEN or run `hf auth login`"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Bundled aliases -> the hub repo a pushed model card names as its base_model (the hub links the two).
HUB_BASES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# huggingface_hub 2.x raises httpx2 errors, datasets re-exports them as `httpx`, older stacks raise requests'
# ConnectionError: matching class names along the MRO covers all three without importing any of them.
NETWORK_ERRORS = {"TransportError", "ConnectionError", "TimeoutError", "Timeout", "OfflineModeIsEnabled"}


class HubError(PeftkitError):
    """The Hugging Face Hub refused or could not be reached; the message says why and what to do."""


def is_repo_id(text: str) -> bool:
    """Return True when text has the shape of a hub repo id, ORG/NAME."""
    return bool(REPO_ID_RE.match(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def offline_reason(offline: bool, key: str) -> str | None:
    """Return why the network must not be used ("model.offline=true", "HF_HUB_OFFLINE=1"), or None when it may."""
    if offline:
        return f"{key}=true"
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]}"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and constants.HF_HUB_OFFLINE:  # set when huggingface_hub was imported
        return "HF_HUB_OFFLINE (set when huggingface_hub was imported)"
    return None


@contextmanager
def offline_mode(on: bool) -> Iterator[None]:
    """Within the block, huggingface_hub and datasets refuse every request, as HF_HUB_OFFLINE=1 at start-up would."""
    if not on:
        yield
        return
    # Both libraries read HF_HUB_OFFLINE once, at import; their module constants are what they check later.
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def is_network_error(exc: BaseException) -> bool:
    """Return True when exc, or an exception it came from, means the hub could not be reached (offline mode included)."""
    return any(c.__name__ in NETWORK_ERRORS for e in _chain(exc) for c in type(e).__mro__)


def model_cache_folder(repo_id: str) -> Path:
    """Return the folder of the local Hugging Face cache where a hub model's files are (or would be)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def not_cached(key: str, repo_id: str, revision: str | None, reason: str, folder: Path, kind: str) -> str:
    """Return the message for a hub model or dataset that offline mode cannot find in the local cache."""
    fetch = f"`hf download {repo_id}`" if kind == "model" else "e.g. `peftkit data inspect CONFIG`"
    at = f" at revision {revision}" if revision else ""
    return (f"{key}={repo_id!r}{at} is not in the local Hugging Face cache (looked in {folder}) and the network is off "
            f"({reason}). Run once with the network on to cache it ({fetch}), copy that cache folder here, "
            f"or point {key} at a local {'folder' if kind == 'model' else 'file'}")


def download_problem(exc: BaseException, repo_id: str, *, key: str, kind: str, revision: str | None = None) -> str:
    """Return what a failed hub download of a model or dataset means and how to fix it."""
    section = key.split(".")[0]
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    text = " ".join(str(e) for e in _chain(exc))
    gated = _find(exc, "GatedRepoError")
    if gated is not None or "is a gated dataset" in text:
        status = _status(gated) or (401 if "must be authenticated" in text else 403 if "ask for access" in text else None)
        why = {401: "no token was sent", 403: "this account has not been granted access yet"}.get(status, "access is restricted")
        return (f"{key}={repo_id!r} is a gated {kind} ({why}): accept its licence on {page} while logged in, "
                f"then {LOGIN} with a token of that account")
    if _find(exc, "RevisionNotFoundError") is not None or "Revision '" in text:
        return f"{section}.revision={revision!r} does not exist in {repo_id}; use a branch, tag or commit listed on {page}"
    if _find(exc, "RepositoryNotFoundError") is not None or "doesn't exist on the Hub" in text:
        return (f"{key}={repo_id!r}: no such {kind} on the Hugging Face Hub, or it is private; check the spelling on {page}, "
                f"and for a private or gated one {LOGIN} with a token that can read it")
    status = _status(_find(exc, "HfHubHTTPError"))
    if status == 401:
        return f"{key}={repo_id!r}: the Hugging Face Hub refused the token (401); {LOGIN} with a valid token"
    if status == 403:
        return f"{key}={repo_id!r}: this token may not read it (403); ask for access on {page}, then {LOGIN}"
    if is_network_error(exc):
        return (f"{key}={repo_id!r}: could not reach the Hugging Face Hub ({type(exc).__name__}); check the network or "
                f"proxy (HF_ENDPOINT), or set {section}.offline=true to use only what is cached")
    return f"{key}={repo_id!r}: the Hugging Face Hub download failed ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------- push

@dataclass
class PushResult:
    """What `push_adapter` uploaded, and where."""

    ref: str
    repo_id: str
    url: str
    private: bool
    files: list[str]
    revision: str | None = None


def push_adapter(registry, ref: str, repo_id: str, *, private: bool = True, token: str | None = None,
                 revision: str | None = None, commit_message: str | None = None, api: Any = None) -> PushResult:
    """Return what was pushed after uploading a registry adapter and its model card to a hub model repo.

    The files are copied out of the registry's store into a temporary folder, the card is written
    there, and that folder is uploaded: nothing in the registry is written, not even a checkout.
    """
    if not is_repo_id(repo_id):
        raise HubError(f"--repo {repo_id!r} must look like ORG/NAME (your user name or an organization, then the repo), "
                       "e.g. --repo my-org/support-bot-lora")
    entry = registry.show(ref)  # an unknown ref raises the registry's own error, with close names
    if (reason := offline_reason(False, "")) is not None:
        raise HubError(f"offline mode is on ({reason}): pushing {entry.ref} needs the network; unset it and run again")
    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"no Hugging Face token to push {entry.ref} with: {LOGIN} (with a token that can write to "
                       f"{repo_id.split('/')[0]}), or pass --token")
    api = api or huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as tmp:
        folder = Path(tmp)
        files = _stage(registry, entry, folder)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            # exist_ok keeps an existing repo as it is: never put an adapter meant to be private into a public repo.
            if private and not getattr(api.model_info(repo_id), "private", True):
                raise HubError(f"{repo_id} already exists and is public; pass --public to push {entry.ref} to it anyway, "
                               "or choose another --repo")
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                              commit_message=commit_message or f"peftkit push {entry.ref}")
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; push_problem sorts them
            raise HubError(push_problem(exc, repo_id)) from None
    return PushResult(entry.ref, repo_id, f"https://huggingface.co/{repo_id}", private, files, revision)


def push_problem(exc: BaseException, repo_id: str) -> str:
    """Return what a failed push means and how to fix it."""
    org = repo_id.split("/")[0]
    status = _status(_find(exc, "HfHubHTTPError"))
    if status == 401:
        return (f"the Hugging Face Hub refused the token (401: missing, expired or revoked); log in with `hf auth login`, "
                f"set HF_TOKEN, or pass --token with a token that can write to {org}")
    if status == 403:
        return (f"no write access to {org} on the Hugging Face Hub (403); push to a namespace this token can write to "
                f"(your user name, or an organization where you have the write role), or use a token with write access to {org}")
    if is_network_error(exc):
        return (f"could not reach the Hugging Face Hub to push to {repo_id} ({type(exc).__name__}: network unreachable); "
                "check the connection or proxy (HF_ENDPOINT) and run again")
    if status is not None:
        return f"the Hugging Face Hub answered {status} while pushing to {repo_id}: {exc}"
    return f"pushing to {repo_id} failed ({type(exc).__name__}: {exc})"


def model_card(entry, stored: str | None) -> str:
    """Return the README.md pushed with an adapter: hub metadata, the training card (or one from the catalog), lineage."""
    import yaml

    from peftkit.eval_report import card_section

    base = HUB_BASES.get(entry.base_model or "", entry.base_model)
    meta: dict[str, Any] = {"library_name": "peft", "tags": ["peftkit", entry.method or "adapter"]}
    if base and is_repo_id(base):  # a local path is no hub model; the hub would flag it
        meta["base_model"] = base
    body = _without_front_matter(stored) if stored else _catalog_card(entry)
    evaluation = (entry.metrics or {}).get("evaluation")
    if evaluation and "## Evaluation" not in body:  # `peftkit eval` ran after training wrote the card
        body = body.rstrip() + "\n\n" + card_section(evaluation)
    rows = [("registry ref", f"`{entry.ref}`" + (f" (tags {', '.join(entry.tags)})" if entry.tags else "")),
            ("method", f"{entry.method}" + (f", rank {entry.rank}" if entry.rank else "")),
            ("base model", f"`{entry.base_model or 'unknown'}` (fingerprint `{entry.base_fingerprint or 'unknown'}`)"),
            ("data fingerprint", f"`{entry.data_fingerprint or 'unknown'}`"),
            ("parent", f"`{entry.parent}`" if entry.parent else "none"),
            ("created", entry.created_at), ("files sha256", f"`{entry.content_sha256}`")]
    lineage = "## Lineage\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body.strip()}\n\n{lineage}"


def _stage(registry, entry, folder: Path) -> list[str]:
    """Copy an entry's stored files into folder with a fresh model card; return the relative paths."""
    stored_card = None
    for record in entry.files:
        blob = registry.store.blob_path(record.sha256)
        if record.path == "README.md":
            stored_card = blob.read_text(encoding="utf-8", errors="replace")
            continue
        target = folder / record.path  # paths were checked to stay inside the folder when registered
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blob, target)
    (folder / "README.md").write_text(model_card(entry, stored_card), encoding="utf-8")
    return sorted({r.path for r in entry.files} | {"README.md"})


def _catalog_card(entry) -> str:
    """Return a card body from catalog fields, for adapters registered without the card training writes."""
    metrics = {k: v for k, v in (entry.metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = "\n".join(f"| {k} | {fmt(v)} |" for k, v in metrics.items()) or "| (none recorded) | |"
    return (f"# {entry.name}\n\nA **{entry.method}** adapter for `{entry.base_model or 'an unknown base'}`, "
            f"pushed from a peftkit registry.\n\n## Metrics\n| metric | value |\n|---|---|\n{table}\n")


def _without_front_matter(text: str) -> str:
    if text.startswith("---\n") and (end := text.find("\n---\n", 4)) >= 0:
        return text[end + 5:]
    return text


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _find(exc: BaseException, name: str) -> BaseException | None:
    """Return the first exception in exc's cause chain that is (a subclass of) the class called name."""
    return next((e for e in _chain(exc) if any(c.__name__ == name for c in type(e).__mro__)), None)


def _status(exc: BaseException | None) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
