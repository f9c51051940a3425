"""Magnitude scores of every prunable group, from a checkpoint read one tensor at a time.

A group's magnitude score is a reduction over its parameter members of each member's per-unit
``sum(|slice| ** p)`` (:class:`fxprune.importance.Magnitude`). Each member score depends on one
tensor alone, so the checkpoint is read tensor by tensor (shard order): every member score a tensor
feeds is computed from it, the tensor is dropped, and each group's member scores (``units`` floats
each) are combined by the criterion itself once all are in. The scores are those
``Magnitude.score`` gives on the loaded model, member for member.

Criteria that need activations or gradients (``"activation"``, ``"wanda"``, ``"obs"``, ``"taylor"``,
``"hessian"``) need the model to run, and are refused with a :class:`ValueError`.

Example::

    >>> scores = stream_scores(dg, dg.prunable_groups, Magnitude(2), Checkpoint("llama-folder"),
    ...                        {"lm_head.weight": "model.embed_tokens.weight"})
    >>> scores[dg.group_of("model.layers.0.mlp.up_proj.weight", 0)].shape
    (11008,)

Per member, ``Magnitude.member_score`` gives the per-unit part when its tensor is read, and ``Magnitude.combine``
(reduction, normaliser) makes each group's score. A tied member absent from the checkpoint (``lm_head.weight``) is
read under the name it shares a parameter with.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fxprune.errors import FxPruneError
from fxprune.importance import CRITERIA, Magnitude, resolve_importance

STREAMED = ("l1", "l2", "lamp")


def streamed_criterion(importance) -> Magnitude:
    """The magnitude criterion named by ``importance`` (or given as a :class:`Magnitude`), else a ValueError."""
    if isinstance(importance, str) and importance in CRITERIA and importance not in STREAMED:
        raise ValueError(f"importance={importance!r} cannot be computed from a checkpoint shard by shard "
                         f"(it needs the model to run on data, or is not a magnitude); choose one of "
                         f"{list(STREAMED)}, or load the model and use fxprune.prune")
    criterion = resolve_importance(importance)
    if not isinstance(criterion, Magnitude):
        raise ValueError(f"prune_checkpoint scores units from the weights one tensor at a time: importance must "
                         f"be one of {list(STREAMED)} or a Magnitude criterion, got {importance!r}")
    return criterion


def stream_scores(dg, groups, criterion: Magnitude, checkpoint, aliases: dict | None = None,
                  progress=None) -> dict:
    """``{group: scores}`` of ``groups`` from ``checkpoint`` (a :class:`fxprune.io.checkpoint.shards.Checkpoint`).

    ``aliases`` maps a graph tensor name the checkpoint lacks to the name it is saved under (a tied
    ``lm_head.weight`` saved as ``model.embed_tokens.weight``). At most one checkpoint tensor is held
    at a time.
    """
    aliases = aliases or {}
    needs: dict[str, list] = {}  # checkpoint name -> (group, member position, member)
    for group in groups:
        for i, member in enumerate(group.parameters):
            key = member.name if member.name in checkpoint else aliases.get(member.name)
            if key is None or key not in checkpoint:
                raise FxPruneError(f"the checkpoint has no tensor {member.name!r} (a member of group G{group.id}); "
                                   f"was it saved from this config?")
            needs.setdefault(key, []).append((group, i, member))
    per_member = {group: [None] * len(group.parameters) for group in groups}
    names = [k for k in checkpoint.keys() if k in needs]
    with torch.no_grad():
        for key in tqdm(names, desc="fxprune scoring", disable=None if progress is None else not progress):
            tensor = checkpoint.read(key)
            for group, i, member in needs[key]:
                per_member[group][i] = criterion.member_score(group, member, tensor)
            del tensor  # before the next one is read
    return {group: criterion.combine(group, parts) for group, parts in per_member.items()}
