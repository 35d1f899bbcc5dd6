"""``promote``: gate + workspace checks, then register a version with lineage and assign a stage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.config.serve import RegistrySection
from llmpipe.registry.gto_cli import Registry, bump, parse_semver
from llmpipe.registry.lineage import build_lineage
from llmpipe.registry.preflight import check_promotable


@dataclass(frozen=True)
class PromotionResult:
    artifact: str
    version: str
    stage: str
    tag: str
    created: bool          # False: HEAD was already registered as this version
    lineage: dict[str, Any]


def promote(
    repo: str | Path,
    cfg: RegistrySection,
    *,
    version: str | None = None,
    stage: str | None = None,
    check_dvc: bool | None = None,
) -> PromotionResult:
    """Promote the model at git HEAD of ``repo`` according to the typed ``registry`` section ``cfg``.

    Raises ``PromotionRefused`` (gate failed, dirty workspace) or ``GtoError``.
    """
    repo = Path(repo)
    artifact = cfg.artifact
    stage = stage or cfg.stage
    check_dvc = cfg.check_dvc_status if check_dvc is None else check_dvc
    check_promotable(repo, gate_file=cfg.gate, check_dvc=check_dvc)

    registry = Registry(repo)
    head = registry.git("rev-parse", "HEAD").strip()
    versions = registry.versions(artifact)
    existing = [v for v in versions if v.commit == head]
    if existing:
        # GTO allows one version per commit: reuse it and only (re)assign the stage.
        found = existing[-1]
        if version and version != found.version:
            raise ValueError(f"HEAD {head[:8]} is already registered as {artifact}@{found.version}")
        version, created = found.version, False
        lineage = registry.lineage(artifact, version)
        needs_assign = bool(stage) and not (stage in found.stages
                                            and registry.stage_version(artifact, stage) == version)
    else:
        if not version:
            version = (bump(versions[-1].version, cfg.bump) if versions else cfg.initial_version)
        parse_semver(version)
        lineage = build_lineage(
            repo,
            artifact=artifact,
            version=version,
            model_path=cfg.model_path,
            data_metrics=cfg.data_metrics,
            eval_metrics=cfg.eval_metrics,
            gate_metrics=cfg.gate,
        )
        registry.register(artifact, version, json.dumps(lineage, sort_keys=True, indent=1))
        created, needs_assign = True, bool(stage)
    if needs_assign:
        registry.assign(artifact, version, stage, f"promote {artifact}@{version} to {stage} (gate passed)")
    return PromotionResult(artifact, version, stage, f"{artifact}@{version}", created, lineage)
