"""One typed configuration layer over params.yaml (see ``llmpipe.config.params``)."""

from llmpipe.config.base import ParamsError, Section
from llmpipe.config.params import Params, StageParams, load_params, load_stage_params, parse_params, read_yaml

__all__ = ["ParamsError", "Params", "Section", "StageParams", "load_params", "load_stage_params",
           "parse_params", "read_yaml"]
