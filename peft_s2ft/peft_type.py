"""The S2FT member of PEFT's type enum.

PEFT's `PeftType` enum cannot be extended, so the plugin owns a one-member `(str, Enum)` whose value is
"S2FT". It compares equal to the string "S2FT" (so JSON configs round-trip) and has `.value`, which
transformers uses to derive the adapter prefix ("s2ft_").
"""

from enum import Enum


class S2FTPeftType(str, Enum):
    S2FT = "S2FT"


PREFIX = "s2ft_"
