"""`python -m aligngpt_hf_cli ...`: the console script without its wrapper."""

import sys

from aligngpt_hf_cli import main

sys.exit(main())
