"""`python -m peft_s2ft` runs the `peft-s2ft` command line."""

import sys

from .cli import main

sys.exit(main())
