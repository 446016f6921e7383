"""``python -m fused_lora.memory``: the calculator's command line."""

import sys

from .calculator import main

sys.exit(main())
