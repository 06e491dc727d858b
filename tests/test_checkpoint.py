"""The elastic checkpoint: safetensors folder, transformers loading, max_slices, atomic writes."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import mobiquant
import mobiquant.checkpoint as checkpoint
from mobiquant import INSTALL_HINT
from mobiquant.checkpoint import (
    LOAD_GUARD,
    CheckpointError,
    load_checkpoint,
    mobi_layers,
    save_checkpoint,
)
from mobiquant.layers import FIXED_DTYPE_BUFFERS, MoBiLinear
from mobiquant.precision import set_precision
from tests.tiny_models import SLICES, VOCAB, logits, quantize_tiny, set_uniform, tiny_model


def saved(tmp_path: Path, family: str = "llama", seed: int = 0, **kwargs: object) -> tuple[torch.nn.Module, Path]:
    model = quantize_tiny(tiny_model(family, seed=seed), seed=seed)
    return model, save_checkpoint(model, tmp_path / f"{family}-ckpt", **kwargs)


def test_folder_holds_safetensors_and_the_quantization_config(tmp_path: Path) -> None:
    model, out = saved(tmp_path, extra_config={"calibration": {"seed": 7}})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "mobiquant"
    assert quant["format"] == "bitplanes-msb-int32-v2"
    assert (quant["num_slices"], quant["group_size"], quant["router_hidden"]) == (SLICES, 32, 16)
    assert quant["linears"] == list(checkpoint.architecture_for("llama").linears)
    assert quant["threshold_bits"] == [2.0 + 0.125 * i for i in range(16 * SLICES - 15)]
    assert quant["calibration"] == {"seed": 7}
    assert config["transformers_weights"] == LOAD_GUARD
    layer = mobi_layers(model)["model.layers.1.mlp.down_proj"]
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        assert torch.equal(handle.get_tensor("model.layers.1.mlp.down_proj.planes"), layer.planes)
        assert torch.equal(handle.get_tensor("model.layers.1.mlp.down_proj.thresholds"), layer.thresholds)
    prefix = "model.layers.0.self_attn.q_proj."
    assert {k.removeprefix(prefix) for k in keys if k.startswith(prefix)} == {
        "planes", "scale", "zero", "gains", "threshold_bits", "thresholds",
        "router.fc1.weight", "router.fc1.bias", "router.fc2.weight", "router.fc2.bias", "router.norm_weight",
    }  # fmt: skip
    # The tied output head is stored once, as the embeddings.
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_round_trip_gives_identical_logits(tmp_path: Path, family: str) -> None:
    model, out = saved(tmp_path, family, seed=3)
    loaded = load_checkpoint(out)
    assert len(mobi_layers(loaded)) == len(mobi_layers(model))
    ids = torch.randint(0, VOCAB, (2, 13))
    for setting in [1, 2, 3, 4, None]:
        set_uniform(model, setting, threshold=0.3)
        set_uniform(loaded, setting, threshold=0.3)
        assert torch.equal(logits(model, ids), logits(loaded, ids)), setting
    for name, layer in mobi_layers(model).items():
        twin = mobi_layers(loaded)[name]
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, twin.state_dict()[key]), f"{name}.{key}"


def test_from_pretrained_after_import_loads_and_generates(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=4)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, MoBiLinear)
    assert loaded.config.quantization_config.num_slices == SLICES
    ids = torch.randint(3, VOCAB, (1, 6))
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    generated = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 11)
    assert torch.equal(generated, expected)


def test_resaving_a_loaded_checkpoint_keeps_everything(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=5, extra_config={"source": {"sha": "abc"}})
    again = save_checkpoint(load_checkpoint(out), tmp_path / "again")
    reloaded = load_checkpoint(again)
    ids = torch.randint(0, VOCAB, (1, 8))
    set_uniform(model, None, threshold=1.3)
    set_uniform(reloaded, None, threshold=1.3)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    first = json.loads((out / "config.json").read_text())
    second = json.loads((again / "config.json").read_text())
    assert first["quantization_config"] == second["quantization_config"]
    assert second["transformers_weights"] == LOAD_GUARD


def test_loading_without_import_fails_clearly(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=6)
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, LlamaForCausalLM\n"
        "for cls in (AutoModelForCausalLM, LlamaForCausalLM):\n"
        "    try:\n"
        "        cls.from_pretrained(sys.argv[1])\n"
        "    except ValueError as error:\n"
        "        print('FAILED', error)\n"
        "    else:\n"
        "        print('LOADED')\n"
        "assert 'mobiquant' not in sys.modules\n"
        "import mobiquant\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(type(model.model.layers[0].mlp.up_proj).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines[:2]:
        assert line.startswith("FAILED") and f"{INSTALL_HINT} and `import mobiquant` before loading" in line
    # The package import alone is enough for transformers to load the checkpoint.
    assert lines[2] == "MoBiLinear"
    assert "pip install ." in INSTALL_HINT and "not on PyPI" in INSTALL_HINT


@pytest.mark.parametrize("hook", ["update_attn_implementation", "update_tp_plan"])
def test_either_config_hook_drops_the_guard_and_reads_the_precision(tmp_path: Path, hook: str) -> None:
    # transformers 5.23 and later show the quantizer the model config through update_attn_implementation, earlier
    # 5.x releases (the GPU image's 5.17) through update_tp_plan: each must drop the guard before the weight files
    # are resolved.
    from transformers import AutoConfig

    _, out = saved(tmp_path, seed=19)
    config = AutoConfig.from_pretrained(out, mobiquant_slices=2)
    assert config.transformers_weights == LOAD_GUARD
    quantizer = checkpoint.MoBiQuantHfQuantizer(checkpoint.MoBiQuantConfig(**config.quantization_config))
    assert getattr(quantizer, hook)(config) is config
    assert config.transformers_weights is None
    assert quantizer._precision == {"slices": 2}


def test_no_weight_renaming_whichever_way_transformers_asks(tmp_path: Path) -> None:
    # transformers 5.23 and later pass the model to update_weight_conversions, the GPU image's 5.17 does not: either
    # way the checkpoint's tensors keep the model's names (the hook asked with one argument failed eval on the GPU).
    from transformers import AutoConfig

    _, out = saved(tmp_path, seed=21)
    config = AutoConfig.from_pretrained(out)
    quantizer = checkpoint.MoBiQuantHfQuantizer(checkpoint.MoBiQuantConfig(**config.quantization_config))
    released_names = [object()]
    assert quantizer.update_weight_conversions(released_names) == []
    assert quantizer.update_weight_conversions(released_names, load_checkpoint(out)) == []


def test_import_is_light_and_registers_when_transformers_is_first_used(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=18)
    # A checkpoint written before the install line changed: its guard is still recognised.
    config = json.loads((out / "config.json").read_text())
    config["transformers_weights"] = (
        "this is a MoBiQuant checkpoint: pip install mobiquant and `import mobiquant` before loading it"
    )
    (out / "config.json").write_text(json.dumps(config))
    script = (
        "import sys\n"
        "import mobiquant\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(type(model.model.layers[0].mlp.up_proj).__name__)\n"
        "import mobiquant.precision\n"
        "print(mobiquant.set_precision is mobiquant.precision.set_precision, 'track_bits' in dir(mobiquant))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "MoBiLinear", "True True"]
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        _ = mobiquant.quantise


def test_max_slices_reads_and_keeps_only_the_first_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = saved(tmp_path, seed=7)
    full = load_checkpoint(out)
    requested: list[object] = []
    real_safe_open = checkpoint.safe_open

    class Spy:
        """Records how each bit-plane tensor is indexed when read."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_tensor(self, key: str) -> torch.Tensor:
            assert not key.endswith(".planes"), "bit planes are read by slice only"
            return self.inner.get_tensor(key)

        def get_slice(self, key: str) -> object:
            lazy = self.inner.get_slice(key)

            class Slice:
                def get_dtype(self) -> str:
                    return lazy.get_dtype()

                def get_shape(self) -> list[int]:
                    return lazy.get_shape()

                def __getitem__(self, index: object) -> torch.Tensor:
                    requested.append(index)
                    return lazy[index]

            return Slice()

    monkeypatch.setattr(checkpoint, "safe_open", Spy)
    ids = torch.randint(0, VOCAB, (2, 9))
    for m in (1, 2, 3):
        requested.clear()
        partial = load_checkpoint(out, max_slices=m)
        layers = mobi_layers(partial)
        assert requested == [slice(None, 2 * m)] * len(layers)
        assert all(layer.planes.shape[0] == 2 * m and layer.stored_slices == m for layer in layers.values())
        for k in range(1, m + 1):
            set_uniform(full, k)
            set_uniform(partial, k)
            assert torch.equal(logits(full, ids), logits(partial, ids))
        set_uniform(partial, m + 1)
        with pytest.raises(ValueError, match="slice counts"):
            logits(partial, ids)
        # Routed tokens asking for more slices than are held (3 or 4 here) get the most held.
        set_uniform(partial, None, threshold=0.5)
        set_uniform(full, m)
        assert torch.equal(logits(full, ids), logits(partial, ids))
    for wrong in (5, 0, 2.5, "2", True):
        with pytest.raises(CheckpointError, match=r"max_slices must be a whole number in 1\.\.4"):
            load_checkpoint(out, max_slices=wrong)
    with pytest.raises(CheckpointError, match="max_slices"):
        save_checkpoint(load_checkpoint(out, max_slices=2), tmp_path / "partial")


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=8, max_shard_size=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = load_checkpoint(out, max_slices=3)
    set_uniform(model, 3)
    ids = torch.randint(0, VOCAB, (1, 7))
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_bfloat16_load_keeps_exact_group_parameters_and_thresholds(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=9)
    loaded = load_checkpoint(out, dtype=torch.bfloat16)
    for name, layer in mobi_layers(loaded).items():
        source = mobi_layers(model)[name]
        assert layer.thresholds.dtype == torch.float32 and torch.equal(layer.thresholds, source.thresholds)
        assert layer.scale.dtype == torch.float16 and torch.equal(layer.scale, source.scale)
        assert layer.gains.dtype == torch.float16 and torch.equal(layer.gains, source.gains)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(loaded, torch.randint(0, VOCAB, (1, 5))).float()).all()


def test_a_dtype_cast_keeps_the_quantization_parameters_exact_through_a_save(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=9)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16):
        loaded.to("cpu", dtype)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(loaded, torch.randint(0, VOCAB, (1, 5))).float()).all()
    loaded.save_pretrained(tmp_path / "resaved")
    # The routers and biases are model weights: like the embeddings, they take the model's dtype.
    kept = (*FIXED_DTYPE_BUFFERS, "planes")
    for reloaded in (load_checkpoint(tmp_path / "resaved"), loaded):
        for name, layer in mobi_layers(reloaded).items():
            source = mobi_layers(model)[name]
            for key in kept:
                stored, original = getattr(layer, key), getattr(source, key)
                assert stored.dtype == original.dtype and torch.equal(stored, original), (name, key)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantize_tiny(tiny_model("llama", seed=10), seed=10)
    target = tmp_path / "out"

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    # The weights are written, then the failure strikes while the folder is flushed.
    monkeypatch.setattr(checkpoint, "_fsync_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    save_checkpoint(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = quantize_tiny(tiny_model("llama", seed=11), seed=11)
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(other, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_save_removes_the_empty_parent_folders_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    model = quantize_tiny(tiny_model("llama", seed=10), seed=10)
    (tmp_path / "existing").mkdir()
    target = tmp_path / "existing" / "new" / "a" / "b" / "out"
    files_of_another_writer: list[Path] = []

    def crash(staging: Path) -> None:
        for file in files_of_another_writer:
            file.write_text("another writer's")
        raise OSError("disk full")

    def tree() -> list[str]:
        return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))

    monkeypatch.setattr(checkpoint, "_fsync_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, target)
    # The empty folder that existed before the save is not the save's to remove.
    assert tree() == ["existing"]
    # Another writer puts a file into one of the new folders meanwhile: that folder, and its parents, stay.
    files_of_another_writer.append(tmp_path / "existing" / "new" / "shared.txt")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, target)
    assert tree() == ["existing", "existing/new", "existing/new/shared.txt"]
    monkeypatch.undo()
    assert save_checkpoint(model, target) == target and (target / "config.json").is_file()


def _staging_of_a_process(target: Path, then: str) -> subprocess.Popen:
    """A process that opens a staging folder for ``target``, writes into it, prints its name and then runs ``then``
    (``kill``: SIGKILL itself; ``wait``: hold it until its stdin closes)."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mobiquant.outputs import staging_folder\n"
        f"with staging_folder(Path({str(target)!r})) as folder:\n"
        "    (folder / 'model.safetensors').write_bytes(b'partial')\n"
        "    print(folder.name, flush=True)\n"
        f"    os.kill(os.getpid(), signal.SIGKILL) if {then!r} == 'kill' else sys.stdin.read()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_save_removes_the_staging_folders_killed_writes_left_and_leaves_running_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantize_tiny(tiny_model("llama", seed=10), seed=10)
    target = tmp_path / "out"
    running = _staging_of_a_process(target, "wait")
    running_name = running.stdout.readline().strip()
    killed = _staging_of_a_process(target, "kill")
    killed_name = killed.stdout.readline().strip()
    assert killed.wait() == -9
    left = {
        # Named by an earlier version (host, pid namespace and pid), in another pid namespace: its process may live.
        "earlier version": f".out.tmp-{socket.gethostname()}-pidns1-1-0ld",
        "other output": ".other.tmp-0123456789ab",
    }
    for name in left.values():
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.lock").touch()
    # A writer killed after removing its folder, before its lock file.
    (tmp_path / ".out.tmp-abcdefabcdef.lock").touch()
    assert (tmp_path / killed_name / "model.safetensors").is_file() and (tmp_path / f"{killed_name}.lock").is_file()
    staged: list[str] = []
    real_fsync_tree = checkpoint._fsync_tree

    def record(staging: Path) -> None:
        staged.append(staging.name)
        assert (staging.parent / f"{staging.name}.lock").is_file()
        real_fsync_tree(staging)

    monkeypatch.setattr(checkpoint, "_fsync_tree", record)
    save_checkpoint(model, target)
    running_files = [running_name, f"{running_name}.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", *running_files, *left.values(), *(f"{name}.lock" for name in left.values())])
    assert re.fullmatch(r"\.out\.tmp-[0-9a-f]{12}", staged[0]), staged
    running.communicate("")
    assert running.returncode == 0
    assert not any(name in running_files for name in (p.name for p in tmp_path.iterdir()))


def test_staging_folders_earlier_versions_left_go_only_when_provably_dead_by_the_rule_those_versions_used(
    tmp_path: Path,
) -> None:
    from mobiquant import outputs

    host, namespace = socket.gethostname(), os.stat("/proc/self/ns/pid").st_ino
    booted = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                  if line.startswith("btime "))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead, alive = finished.pid, os.getpid()
    ours = f"{host}-pidns{namespace}"
    before_boot = booted - 3600
    folders = {
        # .NAME.tmp-HOST-pidnsINODE-PID-*: this host and pid namespace, the pid gone.
        "killed": (f".out.tmp-{ours}-{dead}-k1ll3d_", None),
        "running": (f".out.tmp-{ours}-{alive}-runn1ng", None),
        # A container sharing this hostname but not its pids: its process may live although this pid is gone here.
        "other pid namespace": (f".out.tmp-{host}-pidns{namespace + 1}-{dead}-0th3r", None),
        "other host": (f".out.tmp-{host}-x-pidns{namespace}-{dead}-0th3r", None),
        # .NAME.tmp-HOST-PID-*: no namespace, so only one created before this host booted is provably dead.
        "killed before the boot": (f".out.tmp-{host}-{dead}-0ldk1ll", before_boot),
        "maybe another namespace's": (f".out.tmp-{host}-{dead}-0ldl1ve", None),
        "pid alive, before the boot": (f".out.tmp-{host}-{alive}-0ldrunn", before_boot),
        "other host, before the boot": (f".out.tmp-{host}-x-{dead}-0ld0th3", before_boot),
        "other output": (f".other.tmp-{ours}-{dead}-0th3r", None),
    }
    for name, stamp in folders.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        if stamp is not None:
            os.utime(tmp_path / name, (stamp, stamp))
    gone = {"killed", "killed before the boot"}
    with outputs.staging_folder(tmp_path / "out") as staging:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [staging.name, f"{staging.name}.lock", *(name for what, (name, _) in folders.items() if what not in gone)])


def test_lock_files_a_killed_writer_left_before_renaming_them_go_once_old_and_one_that_cannot_go_fails_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from mobiquant import outputs

    old, fresh = tmp_path / ".out.tmp-0123456789ab.lock-pending", tmp_path / ".out.tmp-abcdef012345.lock-pending"
    for pending in (old, fresh):
        pending.touch()
    stamp = time.time() - outputs.PENDING_GRACE_S - 5
    os.utime(old, (stamp, stamp))
    # Another user's lock file in a sticky folder: free, but not ours to remove.
    foreign = tmp_path / ".out.tmp-fedcba987654.lock"
    foreign.touch()
    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path == foreign:
            raise PermissionError(1, "Operation not permitted", str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with outputs.staging_folder(tmp_path / "out") as staging:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [fresh.name, foreign.name, staging.name, f"{staging.name}.lock"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, foreign.name])


def test_a_target_named_like_a_lock_file_cleans_only_its_own_staging_folders(tmp_path: Path) -> None:
    from mobiquant import outputs

    (tmp_path / ".x").mkdir()
    (tmp_path / ".x" / "keep.txt").write_text("not a staging folder")
    killed = tmp_path / ".x.lock.tmp-0123456789ab"
    killed.mkdir()
    (tmp_path / f"{killed.name}.lock").touch()
    with outputs.staging_folder(tmp_path / "x.lock") as staging:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".x", staging.name, f"{staging.name}.lock"])
    assert (tmp_path / ".x" / "keep.txt").read_text() == "not a staging folder"


def test_a_staging_folder_gets_no_lock_file_where_the_file_system_refuses_locks_and_is_then_never_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    from mobiquant import outputs

    def refused(*_args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    with outputs.staging_folder(tmp_path / "out") as first:
        monkeypatch.setattr(fcntl, "flock", refused)
        with outputs.staging_folder(tmp_path / "out") as unlocked:
            assert not (tmp_path / f"{unlocked.name}.lock").exists()
            monkeypatch.undo()
            with outputs.staging_folder(tmp_path / "out") as third:
                assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
                    [first.name, f"{first.name}.lock", unlocked.name, third.name, f"{third.name}.lock"])
    assert list(tmp_path.iterdir()) == []


def test_existing_folders_are_protected(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=12)
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(model, out)
    other = quantize_tiny(tiny_model("llama", seed=13), seed=13)
    save_checkpoint(other, out, overwrite=True)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(logits(load_checkpoint(out), ids), logits(other, ids))
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(other, empty)
    assert (empty / "model.safetensors").is_file()
    unrelated = tmp_path / "unrelated"
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("kept")
    with pytest.raises(CheckpointError, match="holds no MoBiQuant checkpoint"):
        save_checkpoint(other, unrelated, overwrite=True)
    assert sorted(p.name for p in unrelated.iterdir()) == ["notes.txt", "sub"]


def test_a_symbolic_link_output_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=14)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, out):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target.name)
        with pytest.raises(CheckpointError, match=f"{link} is a symbolic link to {target.name}: save to the folder"):
            save_checkpoint(model, link, overwrite=True)
    assert list(empty.iterdir()) == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link-to-empty", f"link-to-{out.name}", out.name]


def test_overwriting_keeps_the_other_files_but_not_stale_weights(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=14)
    extras = {"README.md": b"# model card\n", "LICENSE": b"Apache-2.0\n", "eval_results/r.json": b'{"ppl": 9.5}\n'}
    for name, data in extras.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    (out / "model-00002-of-00002.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (out / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    other = quantize_tiny(tiny_model("llama", seed=15), seed=15)
    save_checkpoint(other, out, overwrite=True)
    assert {name: (out / name).read_bytes() for name in extras} == extras
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(logits(load_checkpoint(out), ids), logits(other, ids))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_plain_models_and_other_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no MoBiLinear"):
        save_checkpoint(tiny_model("llama"), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    tiny_model("llama").save_pretrained(tmp_path / "fp")
    with pytest.raises(CheckpointError, match="not a MoBiQuant checkpoint"):
        load_checkpoint(tmp_path / "fp")
    (tmp_path / "fp" / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json is not a JSON object but a list"):
        load_checkpoint(tmp_path / "fp")


def test_checkpoint_gets_the_umask_permissions_not_the_staging_ones(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        _, out = saved(tmp_path, "llama")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def _rewrite_tensors(folder: Path, edit: object) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _rewrite_quant_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("missing", ["scale", "zero", "gains", "thresholds", "threshold_bits", "router.fc1.weight"])
def test_both_loaders_refuse_a_checkpoint_missing_a_layer_tensor(tmp_path: Path, missing: str) -> None:
    _, out = saved(tmp_path, seed=14)
    key = f"model.layers.1.mlp.up_proj.{missing}"
    _rewrite_tensors(out, lambda tensors: tensors.pop(key))
    with pytest.raises(CheckpointError, match=f"lacks {re.escape(key)}$"):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(CheckpointError, match=f"lacks {re.escape(key)}$"):
        load_checkpoint(out)


def test_a_quantized_linear_missing_from_the_config_is_refused_by_name(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=14)
    linears = json.loads((out / "config.json").read_text())["quantization_config"]["linears"]
    _rewrite_quant_config(out, linears=[name for name in linears if name != "mlp.gate_proj"])
    for load in (AutoModelForCausalLM.from_pretrained, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"bit planes of model\.layers\.0\.mlp\.gate_proj, a linear its "
                                                  r"quantization_config does not list"):
            load(out)


@pytest.mark.parametrize("tensor", ["thresholds", "gains", "scale", "zero"])
def test_nan_group_parameters_thresholds_and_gains_are_refused(tmp_path: Path, tensor: str) -> None:
    _, out = saved(tmp_path, seed=15)
    key = f"model.layers.0.self_attn.k_proj.{tensor}"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][3] = float("nan")

    _rewrite_tensors(out, poison)
    for load in (AutoModelForCausalLM.from_pretrained, load_checkpoint):
        with pytest.raises(CheckpointError, match=f"{re.escape(key)} holds NaN"):
            load(out)


def test_a_v1_checkpoint_loads_with_unit_gains_and_is_saved_as_v2(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=17)
    _rewrite_tensors(out, lambda tensors: [tensors.pop(key) for key in list(tensors) if key.endswith(".gains")])
    _rewrite_quant_config(out, format="bitplanes-msb-int32-v1")
    for layer in mobi_layers(model).values():
        layer.gains = torch.ones_like(layer.gains)
        layer.cache_dense = False
    ids = torch.randint(0, VOCAB, (2, 11))
    for load in (AutoModelForCausalLM.from_pretrained, load_checkpoint):
        loaded = load(out)
        assert all(torch.equal(layer.gains, torch.ones_like(layer.gains)) for layer in mobi_layers(loaded).values())
        for setting in [1, 3, None]:
            set_uniform(model, setting, threshold=0.3)
            set_uniform(loaded, setting, threshold=0.3)
            assert torch.equal(logits(model, ids), logits(loaded, ids)), setting
    resaved = save_checkpoint(loaded, tmp_path / "resaved")
    assert json.loads((resaved / "config.json").read_text())["quantization_config"]["format"] == (
        "bitplanes-msb-int32-v2")
    with safe_open(resaved / "model.safetensors", framework="pt") as handle:
        assert torch.equal(handle.get_tensor("model.layers.0.mlp.up_proj.gains"), torch.ones(SLICES, 128).half())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_slices": 3}, r"num_slices 3, .*planes is \[8, 64, 2\], the config implies \[6, 64, 2\]"),
        ({"num_slices": 5}, r"num_slices 5, .*planes is \[8, 64, 2\], the config implies \[10, 64, 2\]"),
        ({"group_size": 64}, r"group_size 64, .*scale is \[64, 2\], the config implies \[64, 1\]"),
        ({"threshold_bits": [2.0, 8.0]}, r"2 threshold_bits\).*threshold_bits is \[49\]"),
        ({"threshold_bits": [2.25 + 0.125 * i for i in range(49)]}, r"threshold_bits is \[2\.0, 2\.125"),
        ({"num_slices": 9}, r"num_slices must be a whole number in 1\.\.8"),
    ],
)
def test_config_disagreeing_with_the_tensors_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    _, out = saved(tmp_path, seed=16)
    _rewrite_quant_config(out, **changes)
    for load in (AutoModelForCausalLM.from_pretrained, load_checkpoint):
        with pytest.raises(CheckpointError, match=message):
            load(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.pop("num_slices"), "quantization_config lacks num_slices"),
        (lambda q: q.pop("threshold_bits"), "quantization_config lacks threshold_bits"),
        (lambda q: q.update(group_size=0), "group_size must be a positive multiple of 32, got 0"),
        (lambda q: q.update(group_size="32"), "group_size must be a positive multiple of 32, got '32'"),
        (lambda q: q.update(group_size=96), "self_attn.q_proj: input size 64 is not a multiple of group_size 96"),
        (lambda q: q.update(linears=["self_attn.q_proj", "mlp.w9"]), "'mlp.w9' is not a module of a llama block"),
        (lambda q: q.update(linears="mlp.up_proj"), "linears must be a list of module names"),
        (lambda q: q.update(router_hidden="wide"), "router_hidden must be null or a whole number"),
        (lambda q: q.update(threshold_bits=[2.0, None]), "threshold_bits must be a list of average bits"),
    ],
)
def test_a_malformed_quantization_config_is_one_line_on_every_loader(
    tmp_path: Path, edit: object, message: str
) -> None:
    _, out = saved(tmp_path, seed=16)
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))
    for load in (AutoModelForCausalLM.from_pretrained, load_checkpoint):
        with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
            load(out)
        assert "\n" not in str(caught.value)


def test_an_unsupported_model_type_is_refused_before_loading(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=16)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        load_checkpoint(out)


def test_truncated_weights_file_is_refused(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=17)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
        load_checkpoint(out)


def _layer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t for name, layer in mobi_layers(model).items() for key, t in layer.state_dict().items()}


def test_save_pretrained_round_trips_like_save_checkpoint(tmp_path: Path) -> None:
    model, out = saved(tmp_path, seed=19, extra_config={"calibration": {"seed": 3}})
    loaded = AutoModelForCausalLM.from_pretrained(out)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    first = json.loads((out / "config.json").read_text())
    second = json.loads((again / "config.json").read_text())
    assert second["quantization_config"] == first["quantization_config"]
    assert second["transformers_weights"] == LOAD_GUARD
    assert second["mobiquant_avg_bits"] is None and second["mobiquant_slices"] is None
    ids = torch.randint(0, VOCAB, (2, 11))
    for reloaded in (AutoModelForCausalLM.from_pretrained(again), load_checkpoint(again)):
        assert _layer_state(reloaded).keys() == _layer_state(model).keys()
        assert all(torch.equal(t, _layer_state(model)[k]) for k, t in _layer_state(reloaded).items())
        for setting in [1, 2, 3, 4, None]:
            set_uniform(model, setting, threshold=0.7)
            set_uniform(reloaded, setting, threshold=0.7)
            assert torch.equal(logits(model, ids), logits(reloaded, ids)), setting
    with pytest.raises(CheckpointError, match="holds 2 of 4 slices"):
        load_checkpoint(out, max_slices=2).save_pretrained(tmp_path / "partial" / "model")
    assert not (tmp_path / "partial").exists()
    # Shards: each file's bit planes are found where the index puts them.
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    set_uniform(model, 3)
    assert torch.equal(logits(load_checkpoint(tmp_path / "sharded", max_slices=3), ids), logits(model, ids))


def test_from_pretrained_sets_the_precision_asked_for(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=20)
    ids = torch.randint(0, VOCAB, (2, 9))
    reference = load_checkpoint(out)

    def setting_of(model: torch.nn.Module) -> list[tuple[int | None, float | None]]:
        # A routed layer runs at its threshold; a uniform one ignores it.
        return [(layer.uniform_slices, None if layer.uniform_slices else layer.threshold)
                for layer in mobi_layers(model).values()]

    for kwargs, setting in [
        ({"mobiquant_avg_bits": 3.5}, {"avg_bits": 3.5}),
        ({"mobiquant_avg_bits": "5"}, {"avg_bits": 5.0}),
        ({"mobiquant_slices": 2}, {"slices": 2}),
    ]:
        loaded = AutoModelForCausalLM.from_pretrained(out, **kwargs)
        set_precision(reference, **setting)
        assert setting_of(loaded) == setting_of(reference)
        assert torch.equal(logits(loaded, ids), logits(reference, ids))
    # The precision is a load option, not part of the checkpoint written back.
    loaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["mobiquant_slices"] is None
    with pytest.raises(CheckpointError, match="give one of mobiquant_avg_bits or mobiquant_slices, not both"):
        AutoModelForCausalLM.from_pretrained(out, mobiquant_avg_bits=3.0, mobiquant_slices=2)
    with pytest.raises(CheckpointError, match="mobiquant_avg_bits must be a number, got 'high'"):
        AutoModelForCausalLM.from_pretrained(out, mobiquant_avg_bits="high")
    with pytest.raises(ValueError, match=r"avg_bits must be in \[2, 8\]"):
        AutoModelForCausalLM.from_pretrained(out, mobiquant_avg_bits=9)


@pytest.mark.parametrize(
    "passed, described",
    [
        ("mobiquant", "not str 'mobiquant'"),
        (["linears"], "not list ['linears']"),
        (4, "not int 4"),
        ({"quant_method": "gptq", "bits": 4}, "not a 'gptq' config"),
        ("gptq-config", "not GPTQConfig (quant_method 'gptq')"),
    ],
    ids=["string", "list", "int", "other-method-dict", "other-method-config"],
)
def test_a_quantization_config_argument_of_another_kind_is_one_line_from_mobiquant(
    tmp_path: Path, passed: object, described: str
) -> None:
    from transformers import GPTQConfig

    _, out = saved(tmp_path, seed=21)
    if passed == "gptq-config":
        passed = GPTQConfig(bits=4)
    with pytest.raises(CheckpointError) as caught:
        AutoModelForCausalLM.from_pretrained(out, quantization_config=passed)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("from_pretrained(quantization_config=...) of a MoBiQuant checkpoint takes a "
                              "mobiquant.MoBiQuantConfig or nothing"), message
    assert message.endswith(described), message
    # The class the message names is there to pass.
    assert mobiquant.MoBiQuantConfig is checkpoint.MoBiQuantConfig


def test_a_quantization_config_argument_of_this_method_loads_with_the_checkpoints_own(tmp_path: Path) -> None:
    _, out = saved(tmp_path, seed=22)
    ids = torch.randint(0, VOCAB, (2, 9))
    reference = load_checkpoint(out)
    own = json.loads((out / "config.json").read_text())["quantization_config"]
    # A config of this method, as an object or as the dict that makes one: transformers keeps the checkpoint's own.
    for passed in (checkpoint.MoBiQuantConfig(**own), dict(own), {**own, "group_size": 64}):
        loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=passed)
        assert loaded.config.quantization_config.group_size == own["group_size"]
        assert torch.equal(logits(loaded, ids), logits(reference, ids))
    with pytest.raises(CheckpointError, match=re.escape(
            "from_pretrained(quantization_config=...) is not a valid MoBiQuant config: quantization_config: group_size "
            "must be a positive multiple of 32, got 7")) as caught:
        AutoModelForCausalLM.from_pretrained(out, quantization_config={**own, "group_size": 7})
    assert "\n" not in str(caught.value)
