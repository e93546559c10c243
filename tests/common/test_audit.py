"""The loss-threshold membership-inference attack: exact AUC, and it catches an overfit model."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedsilo.common.audit import loss_threshold_auc, record_losses
from fedsilo.common.datasets import load_builtin
from fedsilo.common.models import build_model
from fedsilo.common.settings import PrivacySettings, TrainSettings
from fedsilo.common.training import plan_round, train_round

losses = st.lists(st.floats(0, 10, allow_nan=False).map(lambda v: round(v, 1)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(members=losses, others=losses)
def test_auc_equals_sklearns_roc_auc_on_minus_the_loss(members: list[float], others: list[float]) -> None:
    truth = [1] * len(members) + [0] * len(others)
    expected = roc_auc_score(truth, -np.array(members + others))
    assert loss_threshold_auc(np.array(members), np.array(others)) == pytest.approx(expected, abs=1e-12)


def test_a_memorizing_non_private_model_is_caught_and_dp_training_much_less() -> None:
    dataset = load_builtin("german-credit")
    x, y = dataset.schema.transform(dataset.frame, source=dataset.name)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, held = order[:100], order[100:400]
    aucs = {}
    for name, privacy in (("no-dp", PrivacySettings(target_epsilon=float("inf"))), ("dp", PrivacySettings(1.0))):
        train_settings = TrainSettings(local_epochs=100, model="mlp", hidden_layers="128")
        model = build_model(train_settings, dataset.schema, seed=0)
        plan = plan_round(num_examples=100, train=train_settings, privacy=privacy, planned_rounds=1)
        train_round(model, x[train], y[train], plan=plan, train=train_settings, max_grad_norm=1.0, seed=1)
        aucs[name] = loss_threshold_auc(
            record_losses(model, x[train], y[train]), record_losses(model, x[held], y[held])
        )
    # The memorizing model gives its training records away; DP-SGD at epsilon 1 far less.
    assert aucs["no-dp"] > 0.62
    assert aucs["dp"] < aucs["no-dp"] - 0.08
