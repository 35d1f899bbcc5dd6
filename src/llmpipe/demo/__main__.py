"""``python -m llmpipe.demo --out data/raw``: regenerate the committed demo data."""

import sys

from llmpipe.demo.support import main

sys.exit(main())
