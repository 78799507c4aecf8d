"""The plugin's members of PEFT's type enum.

PEFT's `PeftType` enum cannot be extended, so the plugin owns `(str, Enum)` types whose values are "S2FT" and
"PACA". Each compares equal to its string (so JSON configs round-trip) and has `.value`, which transformers uses to
derive the adapter prefix. Both methods share the layer and checkpoint format, hence one prefix.
"""

from enum import Enum


class S2FTPeftType(str, Enum):
    S2FT = "S2FT"


class PaCAPeftType(str, Enum):
    PACA = "PACA"


PREFIX = "s2ft_"
