"""The elastic checkpoint: one folder of safetensors that runs at any precision, and its transformers loader.

Layout of a checkpoint folder:

* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``):
  the source model's tensors, except that every quantized linear of every block is stored as the buffers of a
  ``MoBiLinear`` (``planes``, ``scale``, ``zero``, ``gains``, optional ``bias``, ``router.fc{1,2}.{weight,bias}``,
  ``threshold_bits``, ``thresholds``).
* ``config.json``: the source model's config plus ``quantization_config`` (``quant_method: "mobiquant"``, slices,
  group size, router width, quantized linears, packing format, threshold grid, extras), a load guard (below) and
  the load-time precision keys :data:`PRECISION_KEYS` (null).
* tokenizer files and ``generation_config.json`` when given.

``import mobiquant`` registers :class:`MoBiQuantConfig` and :class:`MoBiQuantHfQuantizer` with transformers, so
``AutoModelForCausalLM.from_pretrained(folder)`` builds the model with ``MoBiLinear`` layers, and
``from_pretrained(folder, mobiquant_avg_bits=3.5)`` (or ``mobiquant_slices=2``) loads it running at that precision;
a model loaded so is written back by ``save_pretrained`` and ``push_to_hub`` as this same layout, and
:func:`save_checkpoint` writes a freshly quantized one. Transformers only warns
about an unknown ``quant_method`` and would then load a model whose quantized linears are random. To fail instead,
the config names a weights file that is not a safetensors file (``transformers_weights``): transformers refuses it
with an error quoting :data:`LOAD_GUARD`; the registered quantizer removes the guard before files are resolved.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import os
import re
import reprlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

# Only transformers modules that are complete once transformers.quantizers.auto is: importing mobiquant.checkpoint
# from the end of that import is how ``import mobiquant`` registers the quantizer (see mobiquant/__init__.py).
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from mobiquant import INSTALL_HINT
from mobiquant.arch import Architecture, UnsupportedArchitectureError, architecture_for, architecture_of
from mobiquant.layers import MoBiLinear
from mobiquant.outputs import holds_mobiquant_checkpoint, staging_folder
from mobiquant.precision import set_precision
from mobiquant.slicing import (
    BITS_PER_SLICE,
    FORMAT,
    FORMAT_V1,
    PARAM_DTYPE,
    WORD_BITS,
    SliceShapeError,
    check_num_slices,
    check_slicing_shape,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "mobiquant"
# Formats this version reads; it writes FORMAT. A v1 checkpoint has no row gains: they load as ones.
READ_FORMATS = (FORMAT, FORMAT_V1)
# Keys of a checkpoint's config that set the precision a loaded model runs at: from_pretrained routes a keyword
# argument into the config only where the config already has that key, so every checkpoint carries them, as null.
# A quantization_config passed to from_pretrained cannot carry them: transformers keeps the checkpoint's own config
# and drops the passed one for every method outside its built-in list.
PRECISION_KEYS = {"mobiquant_avg_bits": "avg_bits", "mobiquant_slices": "slices"}
_LOAD_GUARD_PREFIX = "this is a MoBiQuant checkpoint: "
LOAD_GUARD = f"{_LOAD_GUARD_PREFIX}{INSTALL_HINT} and `import mobiquant` before loading it"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_CORE_KEYS = (
    "quant_method",
    "format",
    "num_slices",
    "group_size",
    "router_hidden",
    "blocks",
    "linears",
    "threshold_bits",
)
# Every checkpoint written by any version has these; ``blocks`` is informative only.
_REQUIRED_KEYS = tuple(key for key in _CORE_KEYS if key not in ("quant_method", "blocks"))


# ``from_pretrained`` forwards no custom arguments to a quantizer, so the slice limit of the load in progress is
# passed through a context variable set by ``load_checkpoint``.
_MAX_SLICES: ContextVar[int | None] = ContextVar("mobiquant_max_slices", default=None)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read as asked."""


# --------------------------------------------------------------------------------------------------------------------
# Model surgery


def replace_linears(
    model: nn.Module,
    arch: Architecture,
    num_slices: int,
    group_size: int,
    router_hidden: int | None,
    linears: Sequence[str] | None = None,
    threshold_grid: int | None = None,
) -> nn.Module:
    """Swap every quantized ``nn.Linear`` of every block for an empty ``MoBiLinear`` (same shape, bias, dtype).

    ``linears`` overrides ``arch.linears`` (a checkpoint records the ones it quantized); a name the block lacks, or
    an input size that ``group_size`` does not split, is a :class:`CheckpointError`. The new layers are created on
    the device of the weights they replace, so this also works on a model being built on the meta device.
    """
    names = tuple(linears) if linears is not None else arch.linears
    extra = {} if threshold_grid is None else {"threshold_grid": threshold_grid}
    for block in arch.block_list(model):
        for name in names:
            try:
                linear = block.get_submodule(name)
            except AttributeError as error:
                raise CheckpointError(f"quantized linear {name!r} is not a module of a {arch.name} block") from error
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"{name} in a block of {arch.name} is a {type(linear).__name__}, not nn.Linear")
            try:
                check_slicing_shape(linear.in_features, group_size)
            except SliceShapeError as error:
                raise CheckpointError(f"{name}: {error}") from error
            with torch.device(linear.weight.device):
                layer = MoBiLinear(
                    linear.in_features,
                    linear.out_features,
                    num_slices=num_slices,
                    group_size=group_size,
                    bias=linear.bias is not None,
                    router_hidden=router_hidden,
                    dtype=linear.weight.dtype,
                    **extra,
                )
            block.set_submodule(name, layer)
    return model


def mobi_layers(model: nn.Module) -> dict[str, MoBiLinear]:
    """Every ``MoBiLinear`` of ``model`` by its module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoBiLinear)}


def refuse_quantized(model: nn.Module) -> None:
    """Refuse to calibrate a model that already has MoBiQuant layers (its full-precision weights are gone)."""
    if any(isinstance(module, MoBiLinear) for module in model.modules()):
        raise ValueError("the model is already a MoBiQuant model: quantize its full-precision source")


# --------------------------------------------------------------------------------------------------------------------
# transformers integration


def check_quantization_config(quant: object) -> dict[str, Any]:
    """A checkpoint's ``quantization_config`` checked and normalised, or a one-line :class:`CheckpointError`.

    Every loader reads the config through here: :func:`read_quantization_config` (the commands, before anything
    is loaded) and :class:`MoBiQuantConfig` (``from_pretrained`` and :func:`load_checkpoint`). What depends on
    the model (each listed linear exists, ``group_size`` splits its input size) is checked by
    :func:`replace_linears`, and the tensors against the config by :func:`check_layer_tensors`.
    """
    if not isinstance(quant, Mapping):
        raise CheckpointError(f"quantization_config must be a JSON object, not {type(quant).__name__}")
    method = quant.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise CheckpointError(f"quant_method is {method!r}, expected {QUANT_METHOD!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in quant]
    if missing:
        raise CheckpointError(f"corrupt checkpoint: quantization_config lacks {', '.join(missing)}")
    if quant["format"] not in READ_FORMATS:
        raise CheckpointError(
            f"checkpoint format {quant['format']!r} is not supported (this mobiquant reads {', '.join(READ_FORMATS)}): "
            "upgrade mobiquant"
        )
    try:
        check_num_slices(quant["num_slices"])
    except ValueError as error:
        raise CheckpointError(f"quantization_config: {error}") from error
    group_size, router_hidden = quant["group_size"], quant["router_hidden"]
    if not _whole(group_size) or group_size <= 0 or group_size % WORD_BITS:
        raise CheckpointError(
            f"quantization_config: group_size must be a positive multiple of {WORD_BITS}, got {group_size!r}"
        )
    if router_hidden is not None and (not _whole(router_hidden) or router_hidden < 0):
        raise CheckpointError(
            f"quantization_config: router_hidden must be null or a whole number, got {router_hidden!r}"
        )
    linears = quant["linears"]
    if not isinstance(linears, list) or not all(isinstance(name, str) and name for name in linears):
        raise CheckpointError(f"quantization_config: linears must be a list of module names, got {linears!r}")
    if not linears:
        raise CheckpointError("quantization_config lists no quantized linears")
    bits = quant["threshold_bits"]
    if (
        not isinstance(bits, list) or not bits
        or not all(isinstance(b, int | float) and not isinstance(b, bool) and 2.0 <= b < math.inf for b in bits)
    ):
        raise CheckpointError(f"quantization_config: threshold_bits must be a list of average bits, got {bits!r}")
    return {**quant, "quant_method": QUANT_METHOD, "linears": list(linears), "threshold_bits": [float(b) for b in bits]}


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MoBiQuantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a MoBiQuant checkpoint, as :func:`check_quantization_config` accepts it.

    Keys beyond the core ones are kept as given.
    """

    quant_method: str
    format: str
    num_slices: int
    group_size: int
    router_hidden: int | None
    linears: list[str]
    threshold_bits: list[float]

    def __init__(self, **config: Any) -> None:
        for key, value in check_quantization_config(config).items():
            setattr(self, key, value)


class MoBiQuantHfQuantizer(HfQuantizer):
    """Builds ``MoBiLinear`` layers before transformers loads the weights, then reads their bit planes.

    The bit planes are read here rather than by transformers so that a load limited to ``m`` slices reads only the
    first ``2m`` planes from disk (``safe_open(...).get_slice``) and never holds the others.
    """

    requires_calibration = True
    quantization_config: MoBiQuantConfig

    def __init__(self, quantization_config: MoBiQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.max_slices = _MAX_SLICES.get()
        if self.max_slices is not None and (
            isinstance(self.max_slices, bool) or not isinstance(self.max_slices, int)
            or not 1 <= self.max_slices <= quantization_config.num_slices
        ):
            raise CheckpointError(
                f"max_slices must be a whole number in 1..{quantization_config.num_slices}, got {self.max_slices!r}"
            )
        self._checkpoint_files: list[str] = []
        self._precision: dict[str, float] = {}

    def update_attn_implementation(self, config: Any) -> Any:
        return self._take_model_config(config)

    def update_tp_plan(self, config: Any) -> Any:
        # transformers before 5.23 (the GPU image's 5.17) hands the config to this hook instead.
        return self._take_model_config(config)

    def _take_model_config(self, config: Any) -> Any:
        # The only hooks that see the model config before transformers resolves the weight files: drop the guard
        # that makes loading without this quantizer fail.
        # Checkpoints written by earlier versions carry an earlier wording of the guard.
        if str(getattr(config, "transformers_weights", None)).startswith(_LOAD_GUARD_PREFIX):
            config.transformers_weights = None
        self._precision = load_precision(config)
        return config

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: Sequence[str] | None = None, **kwargs: Any
    ) -> PreTrainedModel:
        qc = self.quantization_config
        arch = architecture_of(model.config)
        # A mixture-of-experts model stores one MoBiLinear per expert linear: its experts are linearised first.
        arch.linearize(model)
        grid = len(qc.threshold_bits) or None
        replace_linears(model, arch, qc.num_slices, qc.group_size, qc.router_hidden, qc.linears, grid)
        self._checkpoint_files = list(checkpoint_files or ())
        check_layer_tensors(model, self._checkpoint_files, qc)
        for layer in mobi_layers(model).values():
            # Without the buffer transformers neither allocates nor reads the planes; they are read afterwards.
            layer.planes = None
        linears = "|".join(re.escape(name) for name in qc.linears)
        planes_key = rf"^{re.escape(arch.blocks)}\.\d+\.(?:{linears})\.planes$"
        model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), planes_key}
        if qc.format == FORMAT_V1:
            gains_key = rf"^{re.escape(arch.blocks)}\.\d+\.(?:{linears})\.gains$"
            model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()), gains_key}
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        read_planes(model, self._checkpoint_files, self.quantization_config.num_slices, self.max_slices)
        if self.quantization_config.format == FORMAT_V1:
            for layer in mobi_layers(model).values():
                layer.gains = torch.ones(layer.num_slices, layer.out_features, dtype=PARAM_DTYPE,
                                         device=layer.scale.device)
        if self._precision:
            set_precision(model, **self._precision)
        _guard_saving(model)
        return model

    def is_serializable(self) -> bool:
        return True

    def update_weight_conversions(self, weight_conversions: list[Any], model: PreTrainedModel | None = None
                                  ) -> list[Any]:
        """None: a checkpoint stores the tensors under the names of the model it loads into. (``model`` is
        optional: transformers before 5.23, as on the GPU image the project checks with, passes none.)

        transformers renames a family's released tensors on load (Mixtral's ``block_sparse_moe`` to ``mlp``, each
        expert's weights into stacked ones) and back on save; the checkpoint's experts are linearised modules
        whose names are already the model's, and must be saved under them too (``_guard_saving``).
        """
        return []

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[None, dict[str, str]]:
        """Ready ``model.config`` for ``save_pretrained``, which writes it as config.json right after this call.

        The config gets what :func:`save_checkpoint` writes: the quantization config recomputed from the layers
        (which also refuses a model loaded with fewer slices) and no load-time precision; the load guard is added
        to the written file (``_save_pretrained_with_guard``). transformers then saves ``model.state_dict()``,
        which holds every ``MoBiLinear`` tensor.
        """
        self.quantization_config = MoBiQuantConfig(**quantization_config_of(model))
        model.config.quantization_config = self.quantization_config
        for key in PRECISION_KEYS:
            setattr(model.config, key, None)
        return None, {}

    @property
    def is_trainable(self) -> bool:
        return False


def attach_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Give an elastic model built in memory (``mobiquant.quantize``) what loading a checkpoint gives it:
    ``save_pretrained`` and ``push_to_hub`` then write what :func:`save_checkpoint` writes (the quantization
    config recomputed from the layers, the precision keys, the load guard), not a plain model's files."""
    model.hf_quantizer = MoBiQuantHfQuantizer(MoBiQuantConfig(**quantization_config_of(model)))
    _guard_saving(model)
    return model


def _guard_saving(model: PreTrainedModel) -> None:
    # transformers' config.save_pretrained drops ``transformers_weights``: without these two, a checkpoint written
    # by save_pretrained or push_to_hub would lose its load guard and load as random weights without mobiquant.
    # Partials of module functions, not bound methods: pickle stores a function by name, where a bound method on the
    # instance is looked up by name on the class when unpickled (and is not there). copy.deepcopy binds them to the
    # copy (its memo maps the model to the copy).
    model.save_pretrained = functools.partial(_save_pretrained_with_guard, model)
    model._upload_modified_files = functools.partial(_upload_with_guard, model)
    model.push_to_hub = functools.partial(_push_to_hub_checked, model)
    # No renaming on save (transformers would give a Mixtral checkpoint's tensors their released names):
    # the checkpoint holds the names of the model it loads into (MoBiQuantHfQuantizer.update_weight_conversions).
    model._weight_conversions = []
    # Loading and attach_quantizer both end here. transformers makes every floating-point tensor it loads a parameter
    # that requires gradients: routers, whose hard threshold passes none, would be given to an optimizer and never
    # move (MoBiLinear builds them frozen).
    for layer in mobi_layers(model).values():
        if layer.router is not None:
            layer.router.requires_grad_(False)


def _write_load_guard(folder: str | os.PathLike) -> None:
    """Put :data:`LOAD_GUARD` into the config.json of ``folder`` (atomically), where one was written."""
    config_file = Path(folder) / CONFIG_NAME
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config["transformers_weights"] = LOAD_GUARD
    staging = config_file.with_name(f".{CONFIG_NAME}.tmp")
    staging.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(staging, config_file)


def _save_pretrained_with_guard(model: PreTrainedModel, save_directory: str | os.PathLike, *args: Any,
                                **kwargs: Any) -> None:
    # transformers creates the folder (and, with push_to_hub=True, the Hub repository) before the quantizer sees
    # the model: a model that cannot be saved is refused first, leaving neither behind.
    quantization_config_of(model)
    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    _write_load_guard(save_directory)


def _push_to_hub_checked(model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
    # push_to_hub creates the Hub repository before it saves: refuse a model that cannot be saved before that.
    quantization_config_of(model)
    connection_errors = _hub_connection_errors()
    try:
        return type(model).push_to_hub(model, *args, **kwargs)
    except connection_errors as error:
        from huggingface_hub import constants

        # The connection may fail after the repository was created: the push is incomplete, not necessarily absent.
        # The model is written to a temporary folder, removed on the way out: nothing is left behind here.
        raise ConnectionError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({error}); the push did "
                              "not complete: check the network, or HF_ENDPOINT") from error


def _hub_connection_errors() -> tuple[type[Exception], ...]:
    """The errors the Hub client's HTTP library raises when no connection can be made to the Hub; none (``()``)
    where that library cannot be told.

    That library is requests, httpx or httpx2 depending on huggingface_hub's version: the one whose HTTPError
    huggingface_hub's HfHubHTTPError derives from. Its connection errors are ConnectError and ConnectTimeout (httpx,
    httpx2) or ConnectionError (requests, whose ConnectTimeout derives from it).
    """
    from huggingface_hub.errors import HfHubHTTPError

    http_error = next((base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"), None)
    library = sys.modules.get(http_error.__module__) if http_error is not None else None
    found = [getattr(library, name, None) for name in ("ConnectError", "ConnectTimeout", "ConnectionError")]
    # Exception classes only: anything else in an except clause raises TypeError when an error reaches it.
    return tuple(error for error in found if isinstance(error, type) and issubclass(error, Exception))


def _upload_with_guard(model: PreTrainedModel, working_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    # Both ways to the Hub (push_to_hub, save_pretrained(push_to_hub=True)) upload the folder through this method.
    _write_load_guard(working_dir)
    return type(model)._upload_modified_files(model, working_dir, *args, **kwargs)


def load_precision(config: Any) -> dict[str, float]:
    """The ``set_precision`` arguments a loader asked for through :data:`PRECISION_KEYS` (empty: none).

    Tools that pass options as text (``--model_args mobiquant_avg_bits=3.5``) may hand over a string.
    """
    asked = {argument: getattr(config, key, None) for key, argument in PRECISION_KEYS.items()}
    asked = {argument: value for argument, value in asked.items() if value is not None}
    if len(asked) > 1:
        raise CheckpointError(f"give one of {' or '.join(PRECISION_KEYS)}, not both")
    for argument, value in asked.items():
        if isinstance(value, str):
            try:
                asked[argument] = int(value) if argument == "slices" else float(value)
            except ValueError as error:
                raise CheckpointError(f"mobiquant_{argument} must be a number, got {value!r}") from error
    return asked


def check_layer_tensors(model: nn.Module, files: Sequence[str | os.PathLike], config: MoBiQuantConfig) -> None:
    """Refuse a checkpoint whose ``MoBiLinear`` tensors are missing, unreadable or at odds with its config.

    ``model`` holds the layers ``config`` describes (on the meta device while transformers loads). Only the
    file headers are read, and the small threshold tables: transformers would otherwise leave a missing
    tensor at its initial value with a warning, and report a shape that disagrees with the config as a
    table of every mismatched key.
    """
    shapes: dict[str, tuple[list[int], str]] = {}
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt") as handle:
                names = handle.keys()  # safe_open has no __iter__
                for key in names:
                    shapes[key] = (list(handle.get_slice(key).get_shape()), os.fspath(file))
        except SafetensorError as error:
            raise CheckpointError(f"corrupt or truncated checkpoint file {file}: {error}") from error
    described = (
        f"num_slices {config.num_slices}, group_size {config.group_size}, "
        f"{len(config.threshold_bits)} threshold_bits"
    )
    tables: dict[str, list[str]] = {}
    for name, layer in mobi_layers(model).items():
        for suffix, tensor in layer.state_dict().items():
            if suffix == "gains" and config.format == FORMAT_V1:
                continue
            key = f"{name}.{suffix}"
            if key not in shapes:
                raise CheckpointError(f"corrupt checkpoint: it lacks {key}")
            shape, file = shapes[key]
            if shape != list(tensor.shape):
                raise CheckpointError(
                    f"checkpoint tensors disagree with its quantization_config ({described}): {key} is {shape}, "
                    f"the config implies {list(tensor.shape)}"
                )
            # Read once more here (the group parameters are a few percent of a checkpoint at group 128): a NaN in
            # any of them would turn every logit into NaN without a word.
            if suffix in ("threshold_bits", "thresholds", "gains", "scale", "zero"):
                tables.setdefault(file, []).append(key)
    listed = {f"{name}.planes" for name in mobi_layers(model)}
    unlisted = sorted(key for key in shapes if key.endswith(".planes") and key not in listed)
    if unlisted:
        # transformers would load the rest, leaving that linear at random weights with only a warning.
        raise CheckpointError(
            f"corrupt checkpoint: it holds the bit planes of {unlisted[0].removesuffix('.planes')}, a linear its "
            f"quantization_config does not list (linears: {', '.join(config.linears)})"
        )
    grid = torch.tensor(config.threshold_bits, dtype=torch.float64, device="cpu")
    for file, keys in tables.items():
        with safe_open(file, framework="pt") as handle:
            for key in keys:
                values = handle.get_tensor(key).double()
                if not torch.isfinite(values).all():
                    raise CheckpointError(f"corrupt checkpoint: {key} holds NaN or infinite values")
                if key.endswith(".threshold_bits") and not torch.allclose(values, grid, rtol=0.0, atol=1e-5):
                    raise CheckpointError(
                        f"checkpoint tensors disagree with its quantization_config: {key} is "
                        f"{[round(v, 6) for v in values.tolist()]}, the config's threshold_bits "
                        f"{config.threshold_bits}"
                    )


def passed_quantization_config(value: object) -> MoBiQuantConfig:
    """What ``from_pretrained(..., quantization_config=value)`` of a MoBiQuant checkpoint may pass: a
    :class:`MoBiQuantConfig`, or a mapping it accepts (made one); anything else is a one-line :class:`CheckpointError`.

    transformers loads a pre-quantized checkpoint with the checkpoint's own config and drops a passed one of the same
    kind (with a warning); one of another kind (a string, a list, another method's config) it refused with an error
    telling to pass "the same quantization config class", without naming it, and refused a dict even of this method.
    """
    if isinstance(value, MoBiQuantConfig):
        return value
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        method = value.get("quant_method", QUANT_METHOD)
        if method == QUANT_METHOD:
            try:
                return MoBiQuantConfig(**value)
            except CheckpointError as error:
                raise CheckpointError(f"from_pretrained(quantization_config=...) is not a valid MoBiQuant config: "
                                      f"{error}") from None
        described = f"a {method!r} config"
    elif isinstance(value, QuantizationConfigMixin):
        method = getattr(value, "quant_method", None)
        described = f"{type(value).__name__} (quant_method {getattr(method, 'value', method)!r})"
    else:
        described = f"{type(value).__name__} {reprlib.repr(value)}"
    raise CheckpointError(
        f"from_pretrained(quantization_config=...) of a MoBiQuant checkpoint takes a mobiquant.MoBiQuantConfig or "
        f"nothing (the checkpoint loads with its own quantization config), not {described}"
    )


def _is_mobiquant_config(quant: object) -> bool:
    if isinstance(quant, Mapping):
        return quant.get("quant_method") == QUANT_METHOD
    return isinstance(quant, MoBiQuantConfig)


def _merge_quantization_configs(cls: type, quantization_config: Any, quantization_config_from_args: Any) -> Any:
    """transformers' ``AutoHfQuantizer.merge_quantization_configs``, with the passed config of a MoBiQuant checkpoint
    checked first (``passed_quantization_config``)."""
    if quantization_config_from_args is not None and _is_mobiquant_config(quantization_config):
        quantization_config_from_args = passed_quantization_config(quantization_config_from_args)
    return _TRANSFORMERS_MERGE(cls, quantization_config, quantization_config_from_args)


_TRANSFORMERS_MERGE = getattr(getattr(AutoHfQuantizer, "merge_quantization_configs", None), "__func__", None)
# A wrapper of an earlier import of this module (reloaded) names the original it wraps.
_TRANSFORMERS_MERGE = getattr(_TRANSFORMERS_MERGE, "transformers_original", _TRANSFORMERS_MERGE)
_merge_quantization_configs.transformers_original = _TRANSFORMERS_MERGE


def register() -> None:
    """Register the MoBiQuant config and quantizer with transformers (idempotent)."""
    merge = AutoHfQuantizer.__dict__.get("merge_quantization_configs")
    if _TRANSFORMERS_MERGE is not None and getattr(merge, "__func__", None) is not _merge_quantization_configs:
        AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not MoBiQuantConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(MoBiQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not MoBiQuantHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(MoBiQuantHfQuantizer)


@contextlib.contextmanager
def _slice_limit(max_slices: int | None) -> Iterator[None]:
    token = _MAX_SLICES.set(max_slices)
    try:
        yield
    finally:
        _MAX_SLICES.reset(token)


def read_planes(model: nn.Module, files: Sequence[str | os.PathLike], num_slices: int, max_slices: int | None) -> None:
    """Fill every ``MoBiLinear`` of ``model`` with its bit planes from ``files``, only the first ``max_slices``."""
    keep = max_slices or num_slices
    layers = mobi_layers(model)
    wanted = {f"{name}.planes": layer for name, layer in layers.items()}
    found: set[str] = set()
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt") as handle:
                for key in wanted.keys() & set(handle.keys()):
                    layer = wanted[key]
                    lazy = handle.get_slice(key)
                    expected = [BITS_PER_SLICE * num_slices, layer.out_features, layer.in_features // WORD_BITS]
                    if lazy.get_dtype() != "I32" or list(lazy.get_shape()) != expected:
                        raise CheckpointError(
                            f"corrupt checkpoint: {key} is {lazy.get_dtype()} {lazy.get_shape()}, not I32 {expected}"
                        )
                    device = layer.scale.device
                    layer.planes = lazy[: BITS_PER_SLICE * keep].to(device)
                    layer.keep_slices(keep)
                    found.add(key)
        except SafetensorError as error:
            raise CheckpointError(f"corrupt checkpoint file {file}: {error}") from error
    missing = sorted(wanted.keys() - found)
    if missing:
        raise CheckpointError(f"checkpoint lacks the bit planes of {len(missing)} layers, e.g. {missing[0]}")


# --------------------------------------------------------------------------------------------------------------------
# Saving


def quantization_config_of(model: nn.Module, extra_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` dict describing ``model``'s ``MoBiLinear`` layers (checked to be uniform)."""
    layers = mobi_layers(model)
    if not layers:
        raise CheckpointError("the model has no MoBiLinear layer: quantize it before saving a MoBiQuant checkpoint")
    arch = architecture_of(model.config)
    blocks = arch.block_list(model)
    linears = [name for name in arch.linears if isinstance(blocks[0].get_submodule(name), MoBiLinear)]
    for index, block in enumerate(blocks):
        found = [name for name, module in block.named_modules() if isinstance(module, MoBiLinear)]
        if sorted(found) != sorted(linears):
            raise CheckpointError(f"block {index} quantizes {sorted(found)}, block 0 quantizes {sorted(linears)}")
    first = next(iter(layers.values()))
    router_hidden = first.router.fc1.out_features if first.router is not None else None
    for name, layer in layers.items():
        hidden = layer.router.fc1.out_features if layer.router is not None else None
        if (layer.num_slices, layer.group_size, hidden) != (first.num_slices, first.group_size, router_hidden):
            raise CheckpointError(f"{name} differs from the other layers in slices, group size or router width")
        if layer.stored_slices != layer.num_slices:
            raise CheckpointError(
                f"{name} holds {layer.stored_slices} of {layer.num_slices} slices (loaded with max_slices): "
                "save from a model loaded with all slices"
            )
        if not torch.equal(layer.threshold_bits.cpu(), first.threshold_bits.cpu()):
            raise CheckpointError(f"{name} has a different threshold grid from the other layers")
    clash = set(extra_config or {}) & set(_CORE_KEYS)
    if clash:
        raise CheckpointError(f"extra_config may not set {sorted(clash)}: they describe the saved layers")
    # Entries already on the model (calibration settings, or those of the checkpoint it was loaded from) are kept;
    # the core entries are always recomputed from the layers themselves.
    previous = getattr(model.config, "quantization_config", None) or {}
    previous = previous if isinstance(previous, dict) else previous.to_dict()
    if previous.get("quant_method") != QUANT_METHOD:
        previous = {}
    config = {key: value for key, value in previous.items() if key not in _CORE_KEYS}
    config.update(extra_config or {})
    config.update(
        quant_method=QUANT_METHOD,
        format=FORMAT,
        num_slices=first.num_slices,
        group_size=first.group_size,
        router_hidden=router_hidden,
        blocks=arch.blocks,
        linears=linears,
        threshold_bits=[round(bits, 6) for bits in first.threshold_bits.tolist()],
    )
    return config


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each stored once: a tied weight (``lm_head`` tied to the embeddings) is dropped."""
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    state = model.state_dict()
    for name in sorted(state, key=lambda key: key in tied_targets):
        tensor = state[name].detach()
        if tensor.device.type == "meta":
            raise CheckpointError(f"{name} has no data (meta tensor): load the model fully before saving")
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:
            if name not in tied_targets:
                raise CheckpointError(f"{name} shares its storage with {seen[ident]} but is not a tied weight")
            continue
        seen[ident] = name
        tensors[name] = tensor.to("cpu").contiguous()
    return tensors


def _config_dict(model: nn.Module, quant_config: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(model.config.to_json_string(use_diff=True))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quant_config
    config["transformers_weights"] = LOAD_GUARD
    config.update(dict.fromkeys(PRECISION_KEYS))
    return config


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for file in files:
            with open(os.path.join(folder, file), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        try:
            save_file({name: tensors[name] for name in names}, str(folder / filename), metadata={"format": "pt"})
        except SafetensorError as error:
            # safetensors reports a failed write (full disk, file size limit) as its own error, not as OSError.
            raise CheckpointError(f"could not write {filename}: {error}") from error
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "format": FORMAT}, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write ``model`` (with ``MoBiLinear`` layers) as a checkpoint folder at ``out_dir``, atomically.

    Everything is written into a temporary folder beside ``out_dir``, flushed to disk, then renamed into place: after
    a failure ``out_dir`` is as it was (absent, or the previous checkpoint when overwriting), and the parent folders
    this save created are removed again while empty. An existing non-empty
    ``out_dir`` is replaced only with ``overwrite=True``, and only if it holds a MoBiQuant checkpoint. Overwriting
    keeps every file and sub-folder of the old checkpoint that this save does not write itself (model card, LICENSE,
    eval results, chat template, ...): they are hard-linked (or copied) into the temporary folder before the rename,
    so re-saving in place (``mobiquant thresholds DIR``, ``save_pretrained``) loses nothing and stays atomic. The old
    weights and weight index (``*.safetensors``, ``*.safetensors.index.json``) are not kept: a shard left from an
    earlier, differently sharded save would be stale. The temporary folder is locked while the save runs: one that a
    killed save left, on any host or container, is removed by the next save to ``out_dir``
    (:func:`mobiquant.outputs.staging_folder`).
    ``extra_config`` entries (calibration settings, source revision, ...) are added to ``quantization_config``.
    Returns the folder.
    """
    out = Path(out_dir).absolute()
    if out.is_symlink():
        # The staged folder is renamed into place, which a link refuses: said before anything is written.
        raise CheckpointError(f"{out} is a symbolic link to {os.readlink(out)}: save to the folder itself")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty: pass overwrite=True to replace it")
        if not holds_mobiquant_checkpoint(out):
            raise CheckpointError(f"{out} is not empty and holds no MoBiQuant checkpoint: overwrite=True only "
                                  "replaces an earlier checkpoint")
        previous = out
    else:
        previous = None
    quant_config = quantization_config_of(model, extra_config)
    tensors = _state_dict_for_saving(model)
    created = _missing_folders(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with staging_folder(out) as staging:
            _write_weights(tensors, staging, max_shard_size)
            config = _config_dict(model, quant_config)
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            _apply_umask(staging)
            if previous is not None:
                # After _apply_umask: the carried files keep their own permissions, and hard links share them.
                _carry_over(previous, staging)
            _fsync_tree(staging)
            _replace_dir(staging, out)
    finally:
        # A failed save leaves no new empty folders; after a success the checkpoint lies in them and they stay.
        _remove_empty_folders(created)
    return out


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first, each the parent of the one before) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            # Not empty (or gone, or not ours to remove): neither it nor its parents are removed.
            return


def _apply_umask(staging: Path) -> None:
    """Give the staged checkpoint the permissions of a plain ``mkdir``/``open`` (tempfile makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for file in staging.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


# Files of an earlier checkpoint that a new save replaces rather than keeps: its weights and weight index.
_NOT_CARRIED = ("*.safetensors", "*.safetensors.index.json")


def _carry_over(old: Path, staging: Path) -> None:
    """Hard-link (or copy) into ``staging`` what the old checkpoint ``old`` holds beyond what the new save wrote."""
    for entry in old.iterdir():
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in _NOT_CARRIED):
            _carry(entry, staging / entry.name)


def _carry(source: Path, target: Path) -> None:
    if source.is_symlink():
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
    elif source.is_dir():
        if os.path.lexists(target) and not target.is_dir():
            return  # the new save wrote a file of that name: it wins
        created = not target.exists()
        if created:
            target.mkdir()
        for child in source.iterdir():
            _carry(child, target / child.name)
        if created:
            shutil.copymode(source, target)  # last: a read-only folder must be filled first
    elif not os.path.lexists(target):
        try:
            os.link(source, target)
        except OSError:  # another file system, or links not supported
            shutil.copy2(source, target)


def _replace_dir(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and restored if the rename fails."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------------------------
# Loading


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``quantization_config`` of the checkpoint folder ``path`` (checked: :func:`check_quantization_config`),
    with a clear error if it is not one or its model type is not supported."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a MoBiQuant checkpoint: it has no {CONFIG_NAME}")
    return quantization_config_in(config_file, os.fspath(path))


def quantization_config_in(config_file: Path, checkpoint: str) -> dict[str, Any]:
    """The checked ``quantization_config`` of ``config_file``, the config of ``checkpoint`` (named in errors)."""
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object but a {type(config).__name__}")
    quant = config.get("quantization_config") or {}
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{checkpoint} is not a MoBiQuant checkpoint (no quant_method {QUANT_METHOD!r} in its config)"
        )
    try:
        architecture_for(config.get("model_type"))
    except UnsupportedArchitectureError as error:
        raise CheckpointError(f"{checkpoint}: {error}") from error
    return check_quantization_config(quant)


def load_checkpoint(
    path: str | os.PathLike,
    max_slices: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """Load a checkpoint folder or Hub id (safetensors only) as a causal LM with ``MoBiLinear`` layers.

    A Hub id is downloaded at ``revision`` (default: the main branch): its safetensors, JSON and tokenizer files,
    never pickles or code. ``max_slices=m`` keeps only the first ``m`` slices of every layer: only those bit planes
    are read from disk. ``dtype`` is the compute dtype of the non-quantized weights (default: the one recorded in
    the config). Any tensor missing from, or left over in, the checkpoint is an error, not a warning.
    """
    from transformers import AutoModelForCausalLM

    if revision is not None or not Path(path).exists():
        from mobiquant.sources import materialize

        # A path that does not exist is refused there by name; a revision given with a folder is refused too.
        # A Hub repository's config is checked before its weights are downloaded.
        path = materialize(path, revision, check_config=quantization_config_in).path
    read_quantization_config(path)
    register()
    try:
        with _slice_limit(max_slices):
            model, info = AutoModelForCausalLM.from_pretrained(
                os.fspath(path),
                dtype=dtype if dtype is not None else "auto",
                device_map=str(device),
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
    except SafetensorError as error:
        # Before the quantizer runs, transformers may read a weights file itself (for its dtype).
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {error}") from error
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys")}
    problems["mismatched_keys"] = sorted(str(key) for key in info.get("mismatched_keys") or ())
    for kind, keys in problems.items():
        if keys:
            raise CheckpointError(f"corrupt checkpoint {path}: {len(keys)} {kind.replace('_', ' ')}, e.g. {keys[0]}")
    return model


# Importing this module (``import mobiquant`` does) is what makes ``from_pretrained`` understand MoBiQuant checkpoints.
register()
