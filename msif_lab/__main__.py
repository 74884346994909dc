"""``python -m msif_lab run | data | paths``: see :mod:`msif_lab.run`."""
import sys

from .run import main

sys.exit(main())
