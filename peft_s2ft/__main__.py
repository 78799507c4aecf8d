"""`python -m peft_s2ft` runs the `peft-s2ft` command line."""

import sys

from .train.cli import main

sys.exit(main())
