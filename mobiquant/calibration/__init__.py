"""Block-by-block calibration of MoBiSlice clipping and MoBiRoute routers (the algorithm and its driver).

``config`` holds the settings, ``trainable`` and ``block`` the algorithm on one block, ``capture`` and
``store`` the files a run works from, and ``driver`` the one sequence of steps every entry point calls.
"""

from mobiquant.calibration.block import BlockResult, calibrate_block, fit_routers_to_errors, quantized_block
from mobiquant.calibration.config import CalibrationConfig, quantization_config
from mobiquant.calibration.driver import (
    assemble,
    calibrate_blocks,
    calibrate_one_block,
    finish,
    finished_model,
    quantize_files,
    quantize_model,
)
from mobiquant.calibration.store import read_result_report
from mobiquant.calibration.trainable import TrainableSlicedLinear

__all__ = [
    "BlockResult",
    "CalibrationConfig",
    "TrainableSlicedLinear",
    "assemble",
    "calibrate_block",
    "calibrate_blocks",
    "calibrate_one_block",
    "finish",
    "finished_model",
    "fit_routers_to_errors",
    "quantization_config",
    "quantize_files",
    "quantize_model",
    "quantized_block",
    "read_result_report",
]
