"""Publishing with the real huggingface_hub client against the local Hub API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi

from flows.compress import preflight
from flows.params import CompressParams, parse_params
from registry.hashing import tree_manifest
from registry.publish import HubRepoTarget, PublishError, check_writable
from tests.pipeline.conftest import tiny_params
from tests.pipeline.hub_server import HubServer


def _release(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\ncard\n")
    return folder


def test_stage_is_one_private_commit_and_promotion_tags_main(hub: HubServer, tmp_path: Path) -> None:
    files = _release(tmp_path / "release")
    target = HubRepoTarget("tester/tiny-mobiquant", endpoint=hub.url, public_on_promotion=True, base_delay=0.01)
    assert target.check_access() == "tester"
    commit = target.stage(files, "stage")
    repo = hub.state.repos["tester/tiny-mobiquant"]
    assert repo.private
    assert set(repo.commits[repo.branches["main"]].files) == {".gitattributes"}
    assert repo.commits[commit].parent is not None
    assert set(repo.commits[commit].files) - {".gitattributes"} == set(tree_manifest(files))
    commits_posted = [p for m, p in hub.state.requests if m == "POST" and "/commit/" in p]
    assert len(commits_posted) == 1

    main = target.promote(commit, tree_manifest(files), "v1")
    refs = HfApi(endpoint=hub.url).list_repo_refs("tester/tiny-mobiquant")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": main}
    assert target.branch_manifest("main") == tree_manifest(files)
    assert not repo.private
    with pytest.raises(PublishError, match=rf"^tester/tiny-mobiquant already has the tag v1 \(commit {main}\)"):
        target.check_tag_free("v1")
    target.check_tag_free("v2")


def _staged_release(hub: HubServer, tmp_path: Path) -> tuple[Path, HubRepoTarget, str, Any]:
    """A release staged on the test Hub: its folder, the target, the staged commit and the server's repo."""
    files = _release(tmp_path / "release")
    target = HubRepoTarget("tester/tiny-mobiquant", endpoint=hub.url, base_delay=0.01)
    staged = target.stage(files, "stage")
    return files, target, staged, hub.state.repos["tester/tiny-mobiquant"]


def test_a_promotion_refuses_to_commit_over_a_main_that_moved_meanwhile(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, target, commit, repo = _staged_release(hub, tmp_path)
    listed = target._files

    def another_promotion_commits_first(revision: str) -> list[str]:
        # Between reading main and committing to it, another promotion publishes its release on main.
        found = listed(revision)
        (tmp_path / "other.txt").write_text("another release")
        HfApi(endpoint=hub.url).upload_file(path_or_fileobj=str(tmp_path / "other.txt"), path_in_repo="other.txt",
                                            repo_id="tester/tiny-mobiquant", revision="main")
        return found

    monkeypatch.setattr(target, "_files", another_promotion_commits_first)
    other = None
    with pytest.raises(PublishError, match=r"^tester/tiny-mobiquant@main moved from \w+ to \w+ while v2 was being "
                       r"promoted \(another promotion\?\): nothing was promoted; run the promotion again$"):
        other = target.promote(commit, tree_manifest(files), "v2")
    assert other is None
    assert set(repo.commits[repo.branches["main"]].files) == {".gitattributes", "other.txt"}
    assert "v2" not in repo.tags
    # Run again, it commits over the main it read.
    monkeypatch.setattr(target, "_files", listed)
    main = target.promote(commit, tree_manifest(files), "v2")
    assert repo.branches["main"] == main == repo.tags["v2"]
    assert set(repo.commits[main].files) == {".gitattributes", *tree_manifest(files)}


def test_a_promotion_whose_commit_landed_but_whose_answer_was_lost_is_not_taken_for_another_promotion(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    files, target, staged, repo = _staged_release(hub, tmp_path)
    commit = target.api.create_commit
    answers_lost: list[str] = []

    def lands_then_times_out(*args: object, **kwargs: object) -> object:
        landed = commit(*args, **kwargs)
        if not answers_lost:
            answers_lost.append(landed.oid)
            # The client marks the operations committed only once it has the answer.
            for operation in args[1]:
                operation._is_committed = False
            response = httpx.Response(504, request=httpx.Request("POST", hub.url))
            raise HfHubHTTPError("504 Gateway Timeout", response=response)
        return landed

    monkeypatch.setattr(target.api, "create_commit", lands_then_times_out)
    main = target.promote(staged, tree_manifest(files), "v1")
    # The retry was refused (main had moved, to this very release): the landed commit is tagged, no second commit.
    assert main == answers_lost[0] == repo.branches["main"] == repo.tags["v1"]
    assert len([p for m, p in hub.state.requests if m == "POST" and "/commit/main" in p]) == 2


def test_missing_token_fails_before_any_work(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    target = HubRepoTarget("tester/x", endpoint=hub.url, base_delay=0.01)
    with pytest.raises(PublishError, match="does not accept the token") as info:
        target.check_access()
    assert "hf_wrong" not in str(info.value)
    assert "tester/x" not in hub.state.repos


def test_no_token_at_all_is_one_line_before_any_work(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    target = HubRepoTarget("tester/x", endpoint=hub.url, base_delay=0.01)
    with pytest.raises(PublishError, match=r"^no Hugging Face token to publish to the Hub at .*hf auth login"):
        target.check_access()
    assert "tester/x" not in hub.state.repos


def test_the_hub_repo_defaults_to_the_token_user_and_one_it_cannot_write_is_refused_before_any_work(
    hub: HubServer, tiny_model: Path, tmp_path: Path
) -> None:
    hub.state.add_folder("meta-llama/tiny-llama", tiny_model)

    def preflight_for(**publish: object) -> CompressParams:
        given = tiny_params(tiny_model, tmp_path, model="meta-llama/tiny-llama",
                            publish={"kind": "hub", "endpoint": hub.url, **publish})
        return preflight(parse_params(given))

    # Not the source's namespace, where the user cannot write, but the token's user's.
    assert preflight_for().publish.repo_id == "tester/tiny-llama-mobiquant"
    with pytest.raises(PublishError, match=r"^tester cannot write to meta-llama/ on the Hub at .*set publish\.repo_id"):
        preflight_for(repo_id="meta-llama/tiny-llama-mobiquant")
    hub.state.orgs = {"acme": "write", "readers": "read"}
    assert preflight_for(repo_id="acme/tiny").publish.repo_id == "acme/tiny"
    with pytest.raises(PublishError, match="cannot write to readers/"):
        preflight_for(repo_id="readers/tiny")
    hub.state.token_role = "read"
    with pytest.raises(PublishError, match="the token of tester is read-only: it cannot write tester/tiny-llama-mob"):
        preflight_for()
    assert not [path for method, path in hub.state.requests if method == "POST"], "nothing created"


def test_a_default_repo_holding_another_owners_model_of_the_same_name_is_refused_before_any_work(
    hub: HubServer, tiny_model: Path, tmp_path: Path
) -> None:
    """The default repo drops the source's owner: meta-llama/tiny-llama and unsloth/tiny-llama both map to
    tester/tiny-llama-mobiquant, and the second release must not overwrite the first."""
    for source in ("meta-llama/tiny-llama", "unsloth/tiny-llama"):
        hub.state.add_folder(source, tiny_model)
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nbase_model: meta-llama/tiny-llama\nlibrary_name: transformers\n---\n# x\n")
    hub.state.add_folder("tester/tiny-llama-mobiquant", card)

    def preflight_for(model: str, **publish: object) -> CompressParams:
        given = tiny_params(tiny_model, tmp_path, model=model, publish={"kind": "hub", "endpoint": hub.url, **publish})
        return preflight(parse_params(given))

    assert preflight_for("meta-llama/tiny-llama").publish.repo_id == "tester/tiny-llama-mobiquant"
    with pytest.raises(PublishError, match=r"^tester/tiny-llama-mobiquant holds the release of meta-llama/tiny-llama, "
                                           r"not of unsloth/tiny-llama: set publish\.repo_id"):
        preflight_for("unsloth/tiny-llama")
    # A repo the user names is theirs to choose.
    assert preflight_for("unsloth/tiny-llama", repo_id="tester/tiny-llama-mobiquant").publish.repo_id == (
        "tester/tiny-llama-mobiquant")
    assert not [path for method, path in hub.state.requests if method == "POST"], "nothing created"


def test_the_test_hub_refuses_writes_outside_the_user_namespaces(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="create repo refused by the Hub"):
        HubRepoTarget("meta-llama/x", endpoint=hub.url, base_delay=0.01).stage(_release(tmp_path / "r"), "stage")
    assert "meta-llama/x" not in hub.state.repos


def _scope(kind: str, name: str, *permissions: str) -> dict[str, object]:
    return {"entity": {"_id": f"id-{name}", "type": kind, "name": name}, "permissions": list(permissions)}


def test_a_fine_grained_token_passes_only_with_repo_write_on_the_namespace(
    hub: HubServer, tiny_model: Path, tmp_path: Path
) -> None:
    hub.state.add_folder("meta-llama/tiny-llama", tiny_model)
    hub.state.orgs = {"acme": "write"}
    hub.state.token_role = "fineGrained"

    def preflight_for(scoped: list[dict[str, object]], global_: tuple[str, ...] = (), **publish: object) -> str:
        hub.state.fine_grained = {"global": list(global_), "scoped": scoped}
        given = tiny_params(tiny_model, tmp_path, model="meta-llama/tiny-llama",
                            publish={"kind": "hub", "endpoint": hub.url, **publish})
        return preflight(parse_params(given)).publish.repo_id

    own_write = _scope("user", "tester", "repo.content.read", "repo.write")
    assert preflight_for([own_write]) == "tester/tiny-llama-mobiquant"
    assert preflight_for([_scope("org", "acme", "repo.write")], repo_id="acme/tiny") == "acme/tiny"
    assert preflight_for([], global_=("repo.write",), repo_id="acme/tiny") == "acme/tiny"
    refused = r"^the fine-grained token of tester has no repo\.write permission on {}/ on the Hub at .*publish\.repo_id"
    # Read-only scope on the namespace.
    with pytest.raises(PublishError, match=refused.format("tester")) as info:
        preflight_for([_scope("user", "tester", "repo.content.read"), _scope("org", "acme", "repo.write")])
    assert "\n" not in str(info.value)
    # Write scope, but on another namespace, or on one repo that does not exist yet (such a token cannot create it).
    with pytest.raises(PublishError, match=refused.format("acme")):
        preflight_for([own_write], repo_id="acme/tiny")
    repo_only = [_scope("model", "acme/tiny", "repo.write")]
    # A private repo the token cannot read looks absent to it: the refusal says so.
    with pytest.raises(PublishError, match=r"^the fine-grained token of tester may write acme/tiny but not create it, "
                                           r"and it does not exist on the Hub at \S+ or this token cannot see it"):
        preflight_for(repo_only, global_=("discussion.write",), repo_id="acme/tiny")
    assert not [path for method, path in hub.state.requests if method == "POST"], "nothing created"
    # What the preflight spares: the Hub refuses the token's staging commit at the end of the run.
    with pytest.raises(PublishError, match="create repo refused by the Hub"):
        HubRepoTarget("acme/tiny", endpoint=hub.url, base_delay=0.01).stage(_release(tmp_path / "r"), "stage")
    # Once the repo exists, write access to it alone passes, and staging commits to it.
    hub.state.add_repo("acme/tiny", private=True)
    assert preflight_for(repo_only, repo_id="acme/tiny") == "acme/tiny"
    target = HubRepoTarget("acme/tiny", endpoint=hub.url, base_delay=0.01)
    staged = target.stage(_release(tmp_path / "r2"), "stage")
    assert hub.state.repos["acme/tiny"].branches[target.staging_branch] == staged
    with pytest.raises(PublishError, match=refused.format("acme")):
        preflight_for([_scope("model", "acme/other", "repo.write")], repo_id="acme/tiny")
    # Scopes the Hub's record nulls or leaves parts out of grant nothing, and are refused as such.
    for fine_grained in (None, {"global": None, "scoped": None},
                         {"scoped": [{"entity": {"type": "user", "name": "tester"}}, {"permissions": ["repo.write"]},
                                     {"entity": None, "permissions": None}]}):
        token = {"role": "fineGrained", "fineGrained": fine_grained}
        with pytest.raises(PublishError, match=refused.format("tester")):
            check_writable({"name": "tester", "auth": {"accessToken": token}}, "tester/x", hub.url, lambda: True)


def test_namespaces_and_base_models_are_compared_ignoring_case_as_the_hub_does(
    hub: HubServer, tiny_model: Path, tmp_path: Path
) -> None:
    hub.state.add_folder("meta-llama/tiny-llama", tiny_model)
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nbase_model: Meta-Llama/Tiny-Llama\n---\n# x\n")
    hub.state.add_folder("tester/tiny-llama-mobiquant", card)
    hub.state.orgs = {"acme": "write"}

    def preflight_for(**publish: object) -> str:
        given = tiny_params(tiny_model, tmp_path, model="meta-llama/tiny-llama",
                            publish={"kind": "hub", "endpoint": hub.url, **publish})
        return preflight(parse_params(given)).publish.repo_id

    assert preflight_for() == "tester/tiny-llama-mobiquant", "the card names the same base model"
    assert preflight_for(repo_id="Tester/tiny") == "Tester/tiny"
    assert preflight_for(repo_id="ACME/tiny") == "ACME/tiny"
    hub.state.token_role = "fineGrained"
    hub.state.fine_grained = {"global": [], "scoped": [_scope("org", "Acme", "repo.write")]}
    assert preflight_for(repo_id="acme/tiny") == "acme/tiny"
    with pytest.raises(PublishError, match="cannot write to readers/"):
        preflight_for(repo_id="readers/tiny")
