"""`python -m ptlm_engine ...` is the `ptlm` command."""
import sys

from ptlm_engine.cli import main

sys.exit(main())
