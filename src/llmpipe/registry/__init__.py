"""Model registry on git tags (GTO): promotion with lineage, and reading versions/stages back.

``promote`` registers a semantic version of the model artifact as an annotated git tag whose
message is the lineage JSON, then assigns it to a stage (``canary`` by default). It refuses when
the gate failed or the workspace differs from the committed pipeline.
"""

from llmpipe.registry.gto_cli import GtoError, Registry
from llmpipe.registry.lineage import build_lineage
from llmpipe.registry.preflight import PromotionRefused, check_promotable
from llmpipe.registry.promote import PromotionResult, promote

__all__ = [
    "GtoError",
    "PromotionRefused",
    "PromotionResult",
    "Registry",
    "build_lineage",
    "check_promotable",
    "promote",
]
