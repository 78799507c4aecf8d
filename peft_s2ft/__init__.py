"""S2FT (structured sparse fine-tuning) as a PEFT tuner. Importing this package registers it."""

from .architectures import SUPPORTED_MODEL_TYPES
from .config import S2FTConfig
from .experts import S2FTExpertsLayer
from .layer import S2FTLayer
from .model import S2FTModel
from .peft_type import S2FTPeftType
from .registration import register

register()

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "S2FTConfig",
    "S2FTExpertsLayer",
    "S2FTLayer",
    "S2FTModel",
    "S2FTPeftType",
    "register",
]
__version__ = "0.1.0"
