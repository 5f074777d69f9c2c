"""``python -m pipelines.serve [--config FILE] [key=value ...]``: see :mod:`pipelines.serve.app`."""

import sys

from pipelines.serve.app import main

sys.exit(main())
