"""S2FT (structured sparse fine-tuning) as a PEFT tuner, and PaCA on the same machinery. Importing this package
registers both."""

from .architectures import SUPPORTED_MODEL_TYPES
from .calibration import CalibrationScores, calibrate_selection
from .config import S2FTConfig
from .experts import S2FTExpertsLayer
from .export import export_lora
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .layer import S2FTLayer
from .model import S2FTModel
from .overlap import selection_overlap
from .paca import PaCAConfig, PaCAModel
from .peft_type import PaCAPeftType, S2FTPeftType
from .registration import register

register()

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CalibrationScores",
    "PaCAConfig",
    "PaCAModel",
    "PaCAPeftType",
    "S2FTConfig",
    "S2FTExpertsLayer",
    "S2FTLayer",
    "S2FTModel",
    "S2FTPeftType",
    "calibrate_selection",
    "export_lora",
    "hotswap_adapter",
    "prepare_model_for_compiled_hotswap",
    "register",
    "selection_overlap",
]
__version__ = "0.1.0"
