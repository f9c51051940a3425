"""Modules for shapes the torch originals cannot hold, and that pruned graphs call instead of a decomposition.

Analysis decomposes a fused module (``nn.MultiheadAttention``) into functional ops so
that the axis algebra can see its heads (:mod:`fxprune.analysis.decompose`); after rewriting, the
``recompose`` pass puts a module back so that the pruned model keeps the fused kernels.
When the pruned widths still fit the torch class, that class is used; when they do not
(pruned heads with the residual width kept, say), the module put back is one of the
subclasses here, which keep the torch class's parameter names and attributes (so
``isinstance``, ``state_dict`` keys, ``fxprune.save`` and ``torch.save`` all work) and
add only the widths and the attention scale the torch class ties together. Capture treats them as leaf
modules and decompose registers a rule for their mask helper, so this package sits below analysis: it may
import ``fxprune.errors`` and nothing else of fxprune. ``ZeroBranch`` stands for a residual branch removed from a
model in place (depth pruning of a branch whose call stays in the model's code).
"""

from fxprune.modules.attention import PrunedMultiheadAttention, merge_masks
from fxprune.modules.zero import ZeroBranch

__all__ = ["PrunedMultiheadAttention", "ZeroBranch", "merge_masks"]
