"""`python -m layoutgen` runs the `layoutgen` command (also the form torchrun uses)."""
import sys

from layoutgen.cli import main

sys.exit(main())
