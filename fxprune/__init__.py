"""fxprune: structural pruning of any PyTorch model on torch.fx graphs (DepGraph's axis algebra)."""

from fxprune.api import analyze, apply, prune
from fxprune.analysis.capture import capture
from fxprune.analysis.depgraph import DependencyGraph, Group, Member
from fxprune.huggingface import load_pretrained
from fxprune.io.plans import PruningPlan, plan_of
from fxprune.io.replay import replay
from fxprune.io.serialize import load, save
from fxprune.errors import CaptureError, DuplicateRuleError, FxPruneError, PlanError, ShapeError
from fxprune.rules.registry import family as register_family
from fxprune.rules.registry import register as register_rule
from fxprune import importance
from fxprune.analysis.macs import count
from fxprune.training.masking import mask
from fxprune.planning.interactive import groups_to_prune
from fxprune.training.pruner import Pruner
from fxprune.analysis.report import report
from fxprune.calibration.distill import DistillResult, distill
from fxprune.io.checkpoint import prune_checkpoint
from fxprune.io.reload import load_pruned, save_pruned

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "DependencyGraph", "DuplicateRuleError", "FxPruneError", "Group", "Member", "PlanError",
    "ShapeError", "analyze", "apply", "capture", "load_pretrained", "prune", "register_family", "register_rule",
]
__all__ += ["PruningPlan", "load", "plan_of", "replay", "save"]  # save, load and replay (issue 5)
__all__ += ["Pruner", "count", "importance", "report"]  # criteria, targets, iterative pruning, MACs (issue 4)
__all__ += ["groups_to_prune", "mask"]  # interactive and soft pruning (issue 12)
__all__ += ["DistillResult", "distill"]  # short knowledge distillation after pruning
__all__ += ["prune_checkpoint"]  # checkpoints pruned shard by shard (issue 11)
__all__ += ["load_pruned", "save_pruned"]  # a pruned state dict into a fresh model of the original class (issue 19)
