"""llmpipe: a reproducible, data-versioned LLM fine-tuning pipeline driven by DVC.

Library modules here know nothing about DVC; the thin entry points in ``stages/`` read
``params.yaml``, call into this package and write outputs and metrics.
"""

__version__ = "0.1.0"
