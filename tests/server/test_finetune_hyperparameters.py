"""Fine-tuning hyperparameters are checked the way the OpenAI API documents them."""

from __future__ import annotations

import pytest

from server.finetune.service import FineTuneInvalid, validate_hyperparameters
from server.finetune.worker import resolve_hyperparameters
from vera_core.train import TrainConfig


def test_hyperparameters() -> None:
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert validate_hyperparameters({}) == auto
    got = validate_hyperparameters({"n_epochs": 4, "learning_rate_multiplier": 0.5})
    assert got == {**auto, "n_epochs": 4, "learning_rate_multiplier": 0.5}
    for bad in (
        {"n_epochs": 0},
        {"n_epochs": 2.5},
        {"n_epochs": True},
        {"batch_size": 65},
        {"learning_rate_multiplier": 0},
        {"learning_rate_multiplier": "fast"},
        {"epochs": 3},
    ):
        with pytest.raises(FineTuneInvalid):
            validate_hyperparameters(bad)
    config = resolve_hyperparameters({**auto, "n_epochs": 4, "learning_rate_multiplier": 0.5})
    assert config.epochs == 4 and config.lr == TrainConfig().lr * 0.5
    assert resolve_hyperparameters(auto) == TrainConfig()
