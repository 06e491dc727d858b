"""A source model read one piece at a time: the whole full-precision model is never in memory.

:class:`ModelFiles` reads a model folder's safetensors files. Its *stem* is the causal LM built on the meta
device with only the tensors outside the transformer blocks loaded (embeddings, final norm, head) in the
source dtype; the blocks stay empty, and :meth:`ModelFiles.block` materialises one block at a time from the
files. :class:`InMemoryModel` gives the same interface over a model already in memory (the Python API and
tests), so the calibration driver and the streamed evaluation have one code path for both.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mobiquant.arch import Architecture, architecture_of
from mobiquant.sources import SourceError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


class BlockSource(Protocol):
    """What the calibration and the streamed evaluation read a model through."""

    config: Any
    arch: Architecture
    num_blocks: int
    source_dtype: torch.dtype

    def stem(self, device: torch.device) -> nn.Module: ...

    def block_structure(self, index: int) -> nn.Module: ...

    def block(self, index: int, device: torch.device) -> nn.Module: ...


def skeleton(config: object, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM with every parameter on the meta device; non-persistent buffers (rotary frequencies) real.

    Built under ``torch.device("meta")`` (thread-local), not accelerate's ``init_empty_weights``, which patches
    ``nn.Module`` for every thread: a block task building a skeleton would put another thread's parameters on
    the meta device. The buffers the files do not hold are then computed as transformers does on load. Attention
    is SDPA where the family supports it, eager otherwise (Gemma 2), whatever the config names: a source saved
    with ``flash_attention_2`` must still open where flash-attn is not installed. A mixture-of-experts family's
    experts are linearised (:func:`mobiquant.arch.linearize_experts`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    attention = "sdpa" if MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa else "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, trust_remote_code=False,
                                                 dtype=dtype)
    for name, buffer in list(model.named_non_persistent_buffers()):
        owner_name, _, buffer_name = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[buffer_name] = torch.empty_like(buffer, device="cpu")
        model._init_weights(owner)
    return architecture_of(config).linearize(model)


class ModelFiles:
    """A model folder (``config.json`` and safetensors files) read block by block."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
        self.arch = architecture_of(self.config)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.folder} holds no safetensors weights")
        self._file_of: dict[str, Path] = {}
        # The model's tensor name -> the name it is stored under (a family's released names, e.g. Mixtral's w1).
        self._stored: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                        name = self.arch.stored_name(key)
                        self._file_of[name] = file
                        self._stored[name] = key
            except SafetensorError as error:
                raise SourceError(f"corrupt weights file {file}: {error}") from error
        self._stem: nn.Module | None = None
        self._stem_device: torch.device | None = None
        meta_model = skeleton(self.config)
        # Blocks are copied from this meta skeleton (cheap) rather than building a new model per block.
        self._meta_blocks = self.arch.block_list(meta_model)
        self.num_blocks = len(self._meta_blocks)
        self._tied = set(getattr(meta_model, "all_tied_weights_keys", None) or {})
        self._shapes = {name: tuple(t.shape) for name, t in meta_model.state_dict().items()}
        # Experts stored stacked (as transformers holds them in memory) rather than one tensor per expert: each
        # expert linear's weight is cut from the stacked tensor on read.
        self._cut: dict[str, tuple[str, int, int | None]] = {}
        for name in self._shapes:
            fused = self.arch.fused_source(name) if name not in self._file_of else None
            if fused is not None and fused[0] in self._file_of:
                self._cut[name] = fused
        first_linear = f"{self.arch.block_prefix(0)}{self.arch.linears[0]}.weight"
        self.source_dtype = self._dtype(first_linear)

    def _dtype(self, name: str) -> torch.dtype:
        if name not in self._file_of:
            raise SourceError(f"{self.folder} lacks the tensor {name}")
        with safe_open(str(self._file_of[name]), "pt") as handle:
            dtype = handle.get_slice(self._stored[name]).get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
            raise SourceError(f"{name} in {self.folder} is {dtype}, not a floating-point weight")
        return _SAFETENSORS_DTYPES[dtype]

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs from the files, with its shape (a tied head is optional)."""
        return {name: shape for name, shape in self._shapes.items()
                if name not in self._tied or name in self._file_of or name in self._cut}

    def check(self) -> None:
        """Every needed tensor present, of the configured shape, floating point and finite; else one clear line.

        Reads one tensor at a time, so a model of any size is checked in the memory of its largest tensor.
        """
        stacked: dict[str, list[str]] = {}
        for name, shape in self.expected_tensors().items():
            if name in self._cut:
                stacked.setdefault(self._cut[name][0], []).append(name)
                continue
            if name not in self._file_of:
                raise SourceError(f"{self.folder} lacks the tensor {name} (shape {list(shape)})")
            # Named as stored, where a user looks for it (Mixtral's block_sparse_moe.experts.3.w1, say).
            stored = self._stored[name]
            with safe_open(str(self._file_of[name]), "pt") as handle:
                lazy = handle.get_slice(stored)
                found = tuple(lazy.get_shape())
                if found != shape:
                    raise SourceError(
                        f"tensor {stored} in {self.folder} has shape {list(found)}, the config needs {list(shape)}"
                    )
                if lazy.get_dtype() not in _SAFETENSORS_DTYPES:
                    raise SourceError(f"tensor {stored} in {self.folder} is {lazy.get_dtype()}, not floating point")
                if not torch.isfinite(handle.get_tensor(stored)).all():
                    raise SourceError(f"{stored} contains NaN or Inf values (in {self.folder})")
        for names in stacked.values():
            # One stacked tensor read once for all its experts.
            for name, tensor in self.read(names).items():
                if tuple(tensor.shape) != self._shapes[name]:
                    raise SourceError(f"{self._cut[name][0]} in {self.folder} gives {name} the shape "
                                      f"{list(tensor.shape)}, the config needs {list(self._shapes[name])}")
                if not tensor.is_floating_point():
                    raise SourceError(f"tensor {self._cut[name][0]} in {self.folder} is {tensor.dtype}, not floating "
                                      "point")
                if not torch.isfinite(tensor).all():
                    raise SourceError(f"{name} contains NaN or Inf values (in {self.folder})")

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors as stored (source dtype), each file opened once."""
        by_file: dict[Path, list[str]] = {}
        cut = {}
        for name in names:
            if name in self._cut:
                cut[name] = self._cut[name]
                continue
            if name not in self._file_of:
                raise SourceError(f"{self.folder} lacks the tensor {name}")
            by_file.setdefault(self._file_of[name], []).append(name)
        for stacked, _expert, _half in cut.values():
            by_file.setdefault(self._file_of[stacked], []).append(stacked)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(str(file), "pt", device=str(device)) as handle:
                for key in dict.fromkeys(keys):
                    tensors[key] = handle.get_tensor(self._stored[key])
        for name, (stacked, expert, half) in cut.items():
            experts = tensors[stacked]
            if experts.dim() != 3 or expert >= len(experts):
                # Indexing would fail with a bare IndexError (a source of fewer experts than its config names).
                raise SourceError(f"{stacked} in {self.folder} has the shape {list(experts.shape)}: the config's "
                                  f"{self.arch.num_experts} experts need {self.arch.num_experts} stacked matrices")
            weight = experts[expert]
            tensors[name] = (weight if half is None else weight.chunk(2, dim=0)[half]).clone()
        for stacked in {stacked for stacked, _expert, _half in cut.values()} - set(names):
            del tensors[stacked]
        return tensors

    def outside_block_tensors(self) -> list[str]:
        """Names of the needed tensors that are not inside a transformer block (embeddings, norm, head)."""
        blocks = f"{self.arch.blocks}."
        return [name for name in self.expected_tensors() if not name.startswith(blocks)]

    def stem(self, device: torch.device) -> nn.Module:
        """The model with its embeddings, final norm and head loaded (source dtype) and its blocks empty."""
        if self._stem is None or self._stem_device != torch.device(device):
            stem = skeleton(self.config, self.source_dtype)
            stem.load_state_dict(self.read(self.outside_block_tensors(), device), strict=False, assign=True)
            stem.tie_weights()
            # Module.to would refuse the empty blocks: the (small, real) buffers move one by one.
            for module in stem.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.device.type != "meta":
                        module._buffers[name] = buffer.to(device)
            self._stem, self._stem_device = stem.eval(), torch.device(device)
        return self._stem

    def block_structure(self, index: int) -> nn.Module:
        """Block ``index`` on the meta device: its modules and shapes, no weights."""
        return self._meta_blocks[index]

    def block(self, index: int, device: torch.device) -> nn.Module:
        """Block ``index`` with its weights, in float32 on ``device``; no other block is read."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} of a model with {self.num_blocks} blocks")
        prefix = self.arch.block_prefix(index)
        names = [name for name in self.expected_tensors() if name.startswith(prefix)]
        state = {name[len(prefix):]: tensor.float() for name, tensor in self.read(names, device).items()}
        block = copy.deepcopy(self._meta_blocks[index])
        block.load_state_dict(state, strict=True, assign=True)
        return block.to(device).eval()



class InMemoryModel:
    """A model already in memory, seen through the same interface as :class:`ModelFiles`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.arch = architecture_of(model.config)
        # In place: a mixture-of-experts model's experts become nn.Linear modules (same outputs).
        self.arch.linearize(model)
        self.num_blocks = len(self.arch.block_list(model))
        self.source_dtype = next(model.parameters()).dtype

    def stem(self, device: torch.device) -> nn.Module:
        # The caller's model stays where it is: only block 0's inputs are computed on it.
        return self.model

    def block_structure(self, index: int) -> nn.Module:
        return self.arch.block_list(self.model)[index]

    def fingerprint(self) -> str:
        """sha256 of the model's configuration and of every weight it will quantize (its resume identity)."""
        digest = hashlib.sha256(self.config.to_json_string(use_diff=False).encode())
        for block in self.arch.block_list(self.model):
            for linear in self.arch.quantized_linears(block).values():
                digest.update(linear.weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def block(self, index: int, device: torch.device) -> nn.Module:
        return copy.deepcopy(self.arch.block_list(self.model)[index]).to(device=device, dtype=torch.float32).eval()
