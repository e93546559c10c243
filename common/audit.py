"""Empirical privacy audit: the loss-threshold membership-inference attack (Yeom et al., CSF 2018).

An attacker who sees the final model guesses that a record was a training
record ("member") when the model's loss on it is low. Its success over every
threshold is the ROC AUC of the score ``-loss`` separating members from
non-members: 0.5 is a coin toss, 1.0 a perfect attack. DP bounds what any such
attack can achieve; the audit shows what it achieves on this data.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn


def record_losses(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The model's cross-entropy loss on every record (no reduction)."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(inputs, dtype=torch.float32))
        losses = nn.functional.cross_entropy(logits, torch.as_tensor(labels), reduction="none")
    return losses.numpy().astype(np.float64)


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the loss-threshold attack: the chance a member's loss is below a non-member's (ties count half).

    The Mann-Whitney statistic over the ranks of the losses, equal to scikit-learn's
    ``roc_auc_score`` with members as positives and ``-loss`` as the score.
    """
    members, others = np.asarray(member_losses, dtype=np.float64), np.asarray(nonmember_losses, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise ValueError("the attack needs at least one member and one non-member record")
    ranks = rankdata(np.concatenate([-members, -others]))  # higher score = more likely a member
    u = ranks[: members.size].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * others.size))
