"""Publishing a checkpoint: one commit on a staging branch, then, after a human review, on ``main``.

Two targets with the same two operations:

* :class:`LocalRepoTarget` (the embedded default): ``<root>/<owner>/<name>/<branch>/`` holds the files
  of each branch exactly as a Hub repo would, ``<root>/<owner>/<name>/refs.json`` the commit id of each
  branch and tag. A commit is written beside the branch and renamed into place, so a reader sees the
  old files or the new ones, never a mix.
* :class:`HubRepoTarget`: the Hugging Face Hub through ``huggingface_hub``. The repo is created private
  (unless configured), every file goes in one ``create_commit`` (atomic on the Hub), and transient
  failures (5xx, 429, connection errors) are retried with exponential backoff.

The Hub token is never passed around: ``HfApi`` reads ``HF_TOKEN`` or the credential store itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    RepoFile,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from flows.params import PublishTarget
from mobiquant.outputs import holds_mobiquant_checkpoint
from registry.hashing import copy_tree_hashed, git_blob_id, manifest_digest, sha256_file, tree_manifest

MAIN = "main"
# Organization roles whose members may create and commit to the organization's repos.
WRITER_ROLES = ("admin", "write", "contributor")
# A fine-grained token's whoami record (``auth.accessToken``) has role "fineGrained" and a "fineGrained" object:
# "global", a list of permissions tied to no entity, and "scoped", a list of {"entity": {"type": "user" | "org" |
# "model" | ..., "name"}, "permissions": [...]}; "repo.write" is the permission to create and commit to repos. This
# is the schema Hugging Face's own trackio reads to check a token's write access (gradio-app/trackio, trackio/ui.py,
# check_auth).
FINE_GRAINED = "fineGrained"
REPO_WRITE = "repo.write"
T = TypeVar("T")


class PublishError(RuntimeError):
    """Publishing failed; the target branch is unchanged."""


class RepoTarget(Protocol):
    repo_id: str

    def stage(self, folder: Path, message: str) -> str:
        """Commit every file of ``folder`` to the staging branch in one commit; return the commit id."""
        ...

    def promote(self, staged_commit: str, expected: dict[str, str], tag: str) -> str:
        """Put the staged commit's files on ``main`` (checked against ``expected``), tag it; return main's commit."""
        ...

    def check_tag_free(self, tag: str) -> None:
        """Refuse a ``tag`` that the repo already has: it marks another release."""
        ...

    def branch_manifest(self, branch: str) -> dict[str, str]:
        """``{path: sha256}`` of a branch (empty when it does not exist)."""
        ...


def _check_manifest(actual: dict[str, str], expected: dict[str, str], what: str) -> None:
    if actual != expected:
        changed = sorted(set(actual) ^ set(expected) | {p for p in actual if expected.get(p) != actual[p]})
        raise PublishError(f"{what} does not match the validated files (differs in: {', '.join(changed[:5])})")


class LocalRepoTarget:
    """A folder laid out like a Hub repo, one sub-folder per branch."""

    def __init__(self, root: str | Path, repo_id: str, staging_branch: str = "staging") -> None:
        self.repo_id = repo_id
        self.path = Path(root).expanduser().resolve() / repo_id
        self.staging_branch = staging_branch

    def _refs(self) -> dict[str, dict[str, str]]:
        refs_file = self.path / "refs.json"
        if refs_file.exists():
            return json.loads(refs_file.read_text())
        return {"branches": {}, "tags": {}}

    def _write_refs(self, refs: dict[str, dict[str, str]]) -> None:
        tmp = self.path / f".refs-{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps(refs, indent=2, sort_keys=True))
        os.replace(tmp, self.path / "refs.json")

    def check_branch(self, branch: str) -> None:
        """Refuse, before anything is written, a repo folder that cannot be made or a ``branch`` folder holding
        files this target did not publish (the preflight runs it, and so does every commit)."""
        existing = next(folder for folder in (self.path, *self.path.parents) if folder.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PublishError(f"cannot publish into {self.path}: {existing} is not a writable folder")
        target = self.path / branch
        if not target.exists():
            return
        known = branch in self._refs()["branches"]
        if not target.is_dir() or (any(target.iterdir()) and not (known or holds_mobiquant_checkpoint(target))):
            raise PublishError(f"{target} holds files this target did not publish: not replacing them")

    def _commit(self, source: Path, branch: str, expected: dict[str, str] | None = None) -> str:
        """Copy ``source``'s files to ``branch`` (checked against ``expected`` when given); return the commit id, the
        digest of the files' sha256s, taken from the bytes as they were copied."""
        self.check_branch(branch)
        tmp = self.path / f".incoming-{uuid.uuid4().hex}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            manifest = copy_tree_hashed(source, tmp)
            if expected is not None:
                _check_manifest(manifest, expected, f"{self.repo_id}@{self.staging_branch}")
            commit = manifest_digest(manifest)
            target = self.path / branch
            retired = self.path / f".retired-{uuid.uuid4().hex}"
            if target.exists():
                os.replace(target, retired)
            os.replace(tmp, target)
        except OSError as error:
            raise PublishError(f"could not write {self.path / branch}: {error}") from error
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
        refs = self._refs()
        refs["branches"][branch] = commit
        self._write_refs(refs)
        return commit

    def stage(self, folder: Path, message: str) -> str:
        return self._commit(folder, self.staging_branch)

    def promote(self, staged_commit: str, expected: dict[str, str], tag: str) -> str:
        refs = self._refs()
        if refs["branches"].get(self.staging_branch) != staged_commit:
            raise PublishError(
                f"{self.repo_id}@{self.staging_branch} is at {refs['branches'].get(self.staging_branch)}, "
                f"not the reviewed commit {staged_commit}"
            )
        commit = self._commit(self.path / self.staging_branch, MAIN, expected)
        refs = self._refs()
        refs["tags"][tag] = commit
        self._write_refs(refs)
        return commit

    def check_tag_free(self, tag: str) -> None:
        tagged = self._refs()["tags"].get(tag)
        if tagged is not None:
            raise PublishError(_tag_taken(self.repo_id, tag, tagged))

    def branch_manifest(self, branch: str) -> dict[str, str]:
        folder = self.path / branch
        return tree_manifest(folder) if folder.is_dir() else {}


def _transient(error: BaseException) -> bool:
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(error, httpx2.TransportError)


def with_backoff(call: Callable[[], T], *, attempts: int = 4, base_delay: float = 1.0, what: str = "request") -> T:
    """Run ``call``, retrying transient Hub failures with exponential backoff; raise PublishError at the end."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (HfHubHTTPError, httpx2.TransportError) as error:
            if not _transient(error):
                raise PublishError(f"{what} refused by the Hub: {error}") from error
            if attempt == attempts:
                raise PublishError(f"{what} failed after {attempts} attempts: {error}") from error
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the loop returns or raises")


def use_hub_timeout(seconds: float) -> None:
    """Give the requests of ``huggingface_hub``'s shared HTTP client a timeout.

    The client waits forever by default, so a Hub that accepts a connection and never answers would hang an
    unattended run; with a timeout the request fails, and ``with_backoff`` retries it. Set before every request
    (cheap), since the library may replace its shared client.
    """
    get_session().timeout = httpx2.Timeout(seconds)


class HubRepoTarget:
    """A Hugging Face Hub model repo (or any server speaking its API, e.g. the tests' local one)."""

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = True,
        staging_branch: str = "staging",
        endpoint: str | None = None,
        public_on_promotion: bool = False,
        attempts: int = 4,
        base_delay: float = 1.0,
        timeout_s: float = 120.0,
    ) -> None:
        self.repo_id = repo_id
        self.private = private
        self.staging_branch = staging_branch
        self.public_on_promotion = public_on_promotion
        self.api = HfApi(endpoint=endpoint)
        self.attempts, self.base_delay, self.timeout_s = attempts, base_delay, timeout_s

    def _retry(self, call: Callable[[], T], what: str) -> T:
        use_hub_timeout(self.timeout_s)
        return with_backoff(call, attempts=self.attempts, base_delay=self.base_delay, what=what)

    def whoami(self) -> dict[str, Any]:
        """The Hub's account record of the token (user, organizations and roles, token role); fails early (before
        any heavy work) without a usable token."""
        try:
            return self._retry(lambda: self.api.whoami(), "whoami")
        except LocalTokenNotFoundError as error:
            raise PublishError(
                f"no Hugging Face token to publish to the Hub at {self.api.endpoint}: log in with `hf auth login` or "
                "set HF_TOKEN"
            ) from error
        except PublishError as error:
            raise PublishError(
                f"the Hub at {self.api.endpoint} does not accept the token from HF_TOKEN or the credential store "
                f"({error.__cause__.__class__.__name__}); log in with `hf auth login` or set HF_TOKEN"
            ) from error

    def released_base_model(self) -> str | None:
        """The base model that the card of the release already in this repo names (its staging branch, else main);
        None for a repo, branch or card that does not exist yet, or a card naming none."""
        for revision in (self.staging_branch, "main"):
            try:
                card = self._retry(
                    lambda revision=revision: self.api.hf_hub_download(self.repo_id, "README.md", revision=revision),
                    f"reading the model card of {self.repo_id} at {revision}",
                )
            except PublishError as error:
                if isinstance(error.__cause__, RepositoryNotFoundError | RevisionNotFoundError | EntryNotFoundError):
                    continue
                raise
            base_model = ModelCard.load(card).data.base_model
            return base_model if isinstance(base_model, str) else None
        return None

    def exists(self) -> bool:
        """Whether the repo exists on the Hub (and the token can see it)."""
        return self._retry(lambda: self.api.repo_exists(self.repo_id), f"checking whether {self.repo_id} exists")

    def check_access(self) -> str:
        """The user the token belongs to; fails early (before any heavy work) without a usable token."""
        return self.whoami()["name"]

    def _head(self, branch: str) -> str:
        return self._retry(lambda: self.api.repo_info(self.repo_id, revision=branch).sha, f"reading {branch}'s head")

    def _files(self, revision: str) -> list[str]:
        return self._retry(lambda: self.api.list_repo_files(self.repo_id, revision=revision), f"listing {revision}")

    def stage(self, folder: Path, message: str) -> str:
        self._retry(lambda: self.api.create_repo(self.repo_id, private=self.private, exist_ok=True), "create repo")
        self._retry(
            lambda: self.api.create_branch(self.repo_id, branch=self.staging_branch, exist_ok=True), "create branch"
        )
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        stale = set(self._files(self.staging_branch)) - set(local) - {".gitattributes"}
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in local]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(stale)]
        info = self._retry(
            lambda: self.api.create_commit(
                self.repo_id, operations, commit_message=message, revision=self.staging_branch
            ),
            f"commit to {self.repo_id}@{self.staging_branch}",
        )
        return info.oid

    def promote(self, staged_commit: str, expected: dict[str, str], tag: str) -> str:
        with tempfile.TemporaryDirectory(prefix="mobiquant-promote-") as tmp:
            folder = Path(
                self._retry(
                    lambda: snapshot_download(
                        self.repo_id, revision=staged_commit, local_dir=tmp, endpoint=self.api.endpoint
                    ),
                    f"download of {self.repo_id}@{staged_commit}",
                )
            )
            got = {rel: sha256_file(folder / rel) for rel in expected if (folder / rel).is_file()}
            _check_manifest(got, expected, f"{self.repo_id}@{staged_commit}")
            # The commit names the main it was computed from: if another promotion moves main meanwhile, the Hub
            # refuses it, instead of main and MLflow's champion ending on different releases.
            head = self._head(MAIN)
            stale = set(self._files(head)) - set(expected) - {".gitattributes"}
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in expected]
            operations += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(stale)]
            try:
                commit = self._retry(
                    lambda: self.api.create_commit(
                        self.repo_id, operations, commit_message=f"Promote {tag} (staged {staged_commit})",
                        revision=MAIN, parent_commit=head,
                    ),
                    f"commit to {self.repo_id}@main",
                ).oid
            except PublishError as error:
                commit = self._head(MAIN)
                if commit == head:
                    raise
                # A retried commit is refused when its first attempt landed and only the answer was lost: then
                # main holds exactly this release.
                if not self._holds(commit, folder, expected):
                    raise PublishError(
                        f"{self.repo_id}@main moved from {head} to {commit} while {tag} was being promoted (another "
                        "promotion?): nothing was promoted; run the promotion again"
                    ) from error
        self._retry(lambda: self.api.create_tag(self.repo_id, tag=tag, revision=commit, exist_ok=True), "tag")
        if self.public_on_promotion:
            self._retry(lambda: self.api.update_repo_settings(self.repo_id, private=False), "make public")
        return commit

    def _holds(self, revision: str, folder: Path, expected: dict[str, str]) -> bool:
        """Whether ``revision`` holds exactly the files of ``expected`` (sha256 by path, checked copies in
        ``folder``) besides ``.gitattributes``: an LFS file by its sha256, any other by its git blob id."""
        entries = self._retry(
            lambda: list(self.api.list_repo_tree(self.repo_id, revision=revision, recursive=True)),
            f"listing {self.repo_id}@{revision}",
        )
        files = {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}
        if set(files) - {".gitattributes"} != set(expected):
            return False
        return all(
            files[rel].lfs.sha256 == expected[rel] if files[rel].lfs is not None
            else files[rel].blob_id == git_blob_id(folder / rel)
            for rel in expected
        )

    def check_tag_free(self, tag: str) -> None:
        refs = self._retry(lambda: self.api.list_repo_refs(self.repo_id), f"listing the tags of {self.repo_id}")
        tagged = next((ref.target_commit for ref in refs.tags if ref.name == tag), None)
        if tagged is not None:
            raise PublishError(_tag_taken(self.repo_id, tag, tagged))

    def branch_manifest(self, branch: str) -> dict[str, str]:
        with tempfile.TemporaryDirectory(prefix="mobiquant-manifest-") as tmp:
            folder = snapshot_download(self.repo_id, revision=branch, local_dir=tmp, endpoint=self.api.endpoint)
            manifest = tree_manifest(folder)
        return {k: v for k, v in manifest.items() if k != ".gitattributes" and not k.startswith(".cache/")}


def _tag_taken(repo_id: str, tag: str, commit: str) -> str:
    return (
        f"{repo_id} already has the tag {tag} (commit {commit}), from another release: the MLflow versions "
        "numbering this repo's releases started again (a new MLflow database, or another registered_model_name for "
        "the same repo); nothing was promoted: use the MLflow store and registered model that published it, or "
        "another publish.repo_id"
    )


def check_writable(
    who: dict[str, Any], repo_id: str, endpoint: str, repo_exists: Callable[[], bool]
) -> None:
    """Refuse, before any heavy work, a repo that the token of ``who`` (:meth:`HubRepoTarget.whoami`'s record) cannot
    write: a read-only token, a namespace that is neither the user's nor an organization where they may write, or a
    fine-grained token without write access to that namespace, unless it may write the repo itself and the repo
    exists (``repo_exists`` is asked only then: such a token cannot create it)."""
    user, namespace = who["name"], repo_id.split("/", 1)[0]
    token = (who.get("auth") or {}).get("accessToken") or {}
    if token.get("role") == "read":
        raise PublishError(f"the token of {user} is read-only: it cannot write {repo_id} on the Hub at {endpoint}")
    writable = {user} | {org["name"] for org in who.get("orgs", []) if org.get("roleInOrg", "write") in WRITER_ROLES}
    if not any(same_hub_name(namespace, name) for name in writable):
        raise PublishError(
            f"{user} cannot write to {namespace}/ on the Hub at {endpoint} (writable: {', '.join(sorted(writable))}): "
            "set publish.repo_id to a repo under one of them"
        )
    if token.get("role") != FINE_GRAINED:
        return
    # The Hub's record may leave out, or null, any part of a fine-grained token's scopes: a missing part grants nothing.
    scopes = token.get(FINE_GRAINED) or {}
    if fine_grained_writes(scopes, namespace):
        return
    if fine_grained_writes_repo(scopes, repo_id):
        if repo_exists():
            return
        raise PublishError(
            f"the fine-grained token of {user} may write {repo_id} but not create it, and it does not exist on the Hub "
            f"at {endpoint} or this token cannot see it: create it first (or give the token read access to it), or "
            f"give the token {REPO_WRITE} on {namespace}/"
        )
    raise PublishError(
        f"the fine-grained token of {user} has no {REPO_WRITE} permission on {namespace}/ on the Hub at "
        f"{endpoint}: give it write access to the repos of {namespace}, or set publish.repo_id to a repo under a "
        "namespace it may write"
    )


def same_hub_name(a: str, b: str) -> bool:
    """Whether two user, organization or repo names name the same thing on the Hub, which ignores their case
    (``HfApi().model_info("mbzuai/bactrian-x")`` answers for ``MBZUAI/Bactrian-X``: huggingface/huggingface_hub
    issues #1453 and #2090, "repo ids are case insensitive across the Hub")."""
    return a.lower() == b.lower()


def fine_grained_writes(scopes: dict[str, Any], namespace: str) -> bool:
    """Whether a fine-grained token's scopes (``auth.accessToken.fineGrained``) let it create and commit to repos of
    ``namespace``: ``repo.write`` on that user or organization, or among its global permissions.

    Write access to one repo is not access to its namespace: see :func:`fine_grained_writes_repo`.
    """
    return REPO_WRITE in (scopes.get("global") or []) or _scoped_write(scopes, ("user", "org"), namespace)


def fine_grained_writes_repo(scopes: dict[str, Any], repo_id: str) -> bool:
    """Whether a fine-grained token's scopes hold ``repo.write`` on the model repo ``repo_id`` itself: enough to
    commit to it once it exists (``create_repo(exist_ok=True)`` then finds it), not to create it."""
    return _scoped_write(scopes, ("model",), repo_id)


def _scoped_write(scopes: dict[str, Any], entity_types: tuple[str, ...], name: str) -> bool:
    """Whether a scoped entry of an entity of ``entity_types`` named ``name`` holds ``repo.write``."""
    return any(
        (scope.get("entity") or {}).get("type") in entity_types
        and same_hub_name((scope.get("entity") or {}).get("name") or "", name)
        and REPO_WRITE in (scope.get("permissions") or [])
        for scope in scopes.get("scoped") or []
    )


def target_for(publish: PublishTarget, repo_id: str) -> LocalRepoTarget | HubRepoTarget:
    if publish.kind == "hub":
        return HubRepoTarget(
            repo_id,
            private=publish.private,
            staging_branch=publish.staging_branch,
            endpoint=publish.endpoint,
            public_on_promotion=publish.public_on_promotion,
            attempts=publish.attempts,
            base_delay=publish.retry_delay_s,
            timeout_s=publish.timeout_s,
        )
    return LocalRepoTarget(publish.root, repo_id, staging_branch=publish.staging_branch)
