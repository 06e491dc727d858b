"""MoBiQuant: one elastic checkpoint per LLM, run at any precision from 2 to 2K bits, chosen per token.

Importing the package registers the ``mobiquant`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(checkpoint_dir)`` loads an elastic checkpoint.
"""

from mobiquant.calibration import CalibrationConfig, quantize_model
from mobiquant.checkpoint import load_checkpoint, save_checkpoint
from mobiquant.layers import MoBiLinear, MoBiRouter
from mobiquant.precision import calibrate_thresholds, set_precision, track_bits
from mobiquant.slicing import SlicedWeight, slice_weight

__all__ = [
    "CalibrationConfig",
    "MoBiLinear",
    "MoBiRouter",
    "SlicedWeight",
    "calibrate_thresholds",
    "load_checkpoint",
    "quantize_model",
    "save_checkpoint",
    "set_precision",
    "slice_weight",
    "track_bits",
]
