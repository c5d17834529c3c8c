"""eval_mode: eval inside the block, the caller's mode restored after it, also after an exception."""

import pytest
from torch import nn

from m3vit.models.modes import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_callers_mode(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training is training
