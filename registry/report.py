"""The human-facing outputs of a run: the perplexity-against-bits plot, the markdown report, the model card."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

# Workers and CI have no display; the Agg backend writes PNG files without one.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend is fixed at import
from huggingface_hub import ModelCard, ModelCardData

from mobiquant import INSTALL_HINT
from mobiquant.arch import summarize_linears
from tasks.gate import GateCheck

PLOT_NAME = "ppl_vs_bits.png"
_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}


@dataclass(frozen=True)
class EvaluationSetup:
    """What the perplexity table was measured on: the data, the windows, the dtype of the full-precision model."""

    data: str
    seqlen: int
    windows: int
    fp_dtype: str

    def describe(self) -> str:
        return (
            f"perplexity on `{self.data}`, {self.windows} non-overlapping windows of {self.seqlen} tokens; "
            f"the full-precision row runs the source model in {self.fp_dtype}"
        )


@dataclass(frozen=True)
class QuantizedModel:
    """What a checkpoint is, from its ``config.json``: the source's family and class, its blocks, and the linears
    quantized in each block (the rest keeps the source's dtype)."""

    model_type: str
    architecture: str
    blocks: int
    linears: tuple[str, ...]

    @classmethod
    def of(cls, model_config: dict[str, Any]) -> QuantizedModel:
        quantization = model_config.get("quantization_config") or {}
        architecture = (model_config.get("architectures") or ["unknown"])[0]
        return cls(str(model_config.get("model_type", "unknown")), architecture,
                   int(model_config.get("num_hidden_layers", 0)), tuple(quantization.get("linears", ())))

    def describe(self) -> str:
        # A mixture of experts lists each expert's linears: one entry per experts module (128 experts of
        # Qwen3-30B-A3B would otherwise be 384 names).
        linears = ", ".join(f"`{name}`" for name in summarize_linears(self.linears))
        return (f"`{self.architecture}` (`{self.model_type}`), {self.blocks} blocks; quantized in every block: "
                f"{linears}; embeddings, norms and the output head keep the source's dtype")

    def tags(self) -> dict[str, str]:
        return {"model_type": self.model_type, "architecture": self.architecture,
                "quantized_linears": ",".join(summarize_linears(self.linears))}


def unreached_linears(blocks: list[dict[str, Any]]) -> str:
    """The linears no calibration token reached, per block (``block 1: mlp.experts.<0,5>.gate_proj/up_proj/
    down_proj``), from the block results' reports; empty when every linear was reached.

    Such an expert's codes minimise its weight error alone and its router is constant (docs/method.md): a reviewer
    weighs that against the calibration data's size. A result saved before this was recorded names none."""
    return "; ".join(f"block {block['block']}: {', '.join(summarize_linears(block['unreached']))}"
                     for block in sorted(blocks, key=lambda b: b["block"]) if block.get("unreached"))


def plot_ppl_vs_bits(validation: dict[str, Any], out_path: str | Path) -> Path:
    """Routed, uniform and RTN perplexity against average bits, full precision as a line."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    routed = sorted((r["avg_bits"], r["ppl"]) for r in validation["budgets"])
    uniform = sorted((r["avg_bits"], r["ppl"]) for r in validation.get("uniform", []))
    rtn = sorted((float(r["bits"]), r["ppl"]) for r in validation.get("rtn", []))
    for points, label, style in (
        (routed, "MoBiQuant routed", "o-"),
        (uniform, "MoBiQuant uniform", "s--"),
        (rtn, "RTN", "x:"),
    ):
        finite = [(b, p) for b, p in points if math.isfinite(p)]
        if finite:
            ax.plot(*zip(*finite, strict=True), style, label=label)
    ax.axhline(validation["fp"]["ppl"], color="grey", linewidth=1, label="full precision")
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def ppl_table(validation: dict[str, Any], setup: EvaluationSetup) -> str:
    """Markdown table: one row per setting, perplexity and measured average bits."""
    rows = ["| setting | average bits | perplexity |", "|---|---|---|"]
    fp_bits = _DTYPE_BITS[setup.fp_dtype]
    rows.append(f"| full precision ({setup.fp_dtype}) | {fp_bits} | {validation['fp']['ppl']:.3f} |")
    for r in validation.get("uniform", []):
        rows.append(f"| uniform {r['slices']} slice(s) | {r['avg_bits']:.2f} | {r['ppl']:.3f} |")
    for r in validation["budgets"]:
        rows.append(f"| routed, budget {r['target_bits']:g} | {r['avg_bits']:.2f} | {r['ppl']:.3f} |")
    for r in validation.get("rtn", []):
        rows.append(f"| RTN {r['bits']}-bit | {float(r['bits']):.2f} | {r['ppl']:.3f} |")
    return "\n".join(rows)


def gate_table(checks: list[GateCheck]) -> str:
    rows = ["| check | value | limit | result |", "|---|---|---|---|"]
    rows += [f"| {c.name} | {c.value:.4g} | {c.limit:.4g} | {'pass' if c.passed else 'FAIL'} |" for c in checks]
    return "\n".join(rows)


def stage_table(stages: dict[str, dict[str, float]], wall_seconds: float) -> tuple[str, float]:
    """Stage times and the share of the run spent outside the plain functions (orchestration, tracking).

    ``stages`` maps a stage to ``{"wall": seconds seen by the flow, "work": seconds inside the function}``.
    The calibration stage's work is the span from its first block start to its last block end, so
    parallel blocks are not counted twice.
    """
    rows = ["| stage | wall s | work s |", "|---|---|---|"]
    work = 0.0
    for name, times in stages.items():
        rows.append(f"| {name} | {times['wall']:.2f} | {times['work']:.2f} |")
        work += times["work"]
    overhead = max(0.0, wall_seconds - work) / wall_seconds if wall_seconds > 0 else 0.0
    rows.append(f"| **total** | {wall_seconds:.2f} | {work:.2f} |")
    rows.append(f"\nOrchestration and tracking overhead: {100 * overhead:.1f}% of the run's wall time.")
    return "\n".join(rows), overhead


def markdown_report(
    *,
    title: str,
    source: dict[str, Any],
    config: dict[str, Any],
    validation: dict[str, Any],
    setup: EvaluationSetup,
    checks: list[GateCheck],
    passed: bool,
    stages_md: str,
    files: dict[str, str],
    extra: dict[str, str] | None = None,
) -> str:
    lines = [
        f"# {title}",
        "",
        f"**Gate: {'PASSED' if passed else 'FAILED'}**",
        "",
        f"Source: `{source['source']}` ({source['kind']}), sha `{source['sha']}`",
        "",
        "## Perplexity",
        "",
        f"{setup.describe()}.",
        "",
        ppl_table(validation, setup),
        "",
        f"![perplexity against bits]({PLOT_NAME})",
        "",
        "## Gate",
        "",
        gate_table(checks),
        "",
        "## Stage times",
        "",
        stages_md,
        "",
        "## Parameters",
        "",
        "| option | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(config.items())],
        "",
        "## Files (sha256)",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {path} | `{digest}` |" for path, digest in sorted(files.items())],
    ]
    for key, value in (extra or {}).items():
        lines += ["", f"**{key}**: {value}"]
    return "\n".join(lines) + "\n"


def model_card(
    *,
    repo_id: str,
    base_model: str | None,
    license_id: str | None,
    validation: dict[str, Any],
    setup: EvaluationSetup,
    config: dict[str, Any],
    model: QuantizedModel,
    files: dict[str, str],
) -> str:
    """The README.md of the published repo: metadata for the Hub, what is quantized, install and usage, the
    perplexity table and plot.

    The license is the source model's (``license_id``); where the source names none the card says so.
    """
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        license=license_id or "other",
        library_name="transformers",
        tags=["mobiquant", "quantized", "any-precision", "elastic-precision", f"{config['num_slices']}-slices",
              model.model_type],
        pipeline_tag="text-generation",
    )
    budgets = ", ".join(f"{r['target_bits']:g}" for r in validation["budgets"])
    license_line = (
        f"License: `{license_id}`, carried from the source model."
        if license_id
        else "License: the source model names none; check its terms before using this checkpoint."
    )
    body = f"""
# {repo_id.split("/", 1)[1]}

A MoBiQuant elastic any-precision checkpoint{
        f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    }: one set of
weights that runs at any average precision between 2 and {2 * config["num_slices"]} bits, chosen per token by
a router in every quantized linear layer ({config["num_slices"]} slices of 2 bits, group size
{config["group_size"]}).

Model: {model.describe()}.

## Install

Loading needs the `mobiquant` package: {INSTALL_HINT}.

## Usage

```python
import mobiquant  # registers the MoBiQuant quantizer with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
mobiquant.set_precision(model, avg_bits=3.0)  # or slices=k for uniform precision
inputs = tokenizer("To be, or not to be", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

Tools that only call `from_pretrained` pick the precision at load:
`AutoModelForCausalLM.from_pretrained("{repo_id}", mobiquant_avg_bits=3.0)` (or `mobiquant_slices=k`).

## Perplexity

Validated budgets (average bits): {budgets}; {setup.describe()}.

{ppl_table(validation, setup)}

![perplexity against bits]({PLOT_NAME})

## License

{license_line}

## Files

| file | sha256 |
|---|---|
""" + "\n".join(f"| {path} | `{digest}` |" for path, digest in sorted(files.items()))
    # ModelCard parses the front matter back, so malformed metadata fails here and not on the Hub.
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}\n").content
