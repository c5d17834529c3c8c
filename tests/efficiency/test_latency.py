"""``efficiency.latency``: one model's settings, and several models side by side, timed round-robin."""

from __future__ import annotations

import torch

from m3vit.efficiency import measure_latency
from m3vit.efficiency.latency import measure_latency_side_by_side
from m3vit.models import create_model

TASKS = {"semseg": 4, "sal": 1}
SMALL = dict(embed_dim=32, depth=2, num_heads=2, head_channels=8)


def _models():
    torch.manual_seed(0)
    return {"m3vit": create_model("m3vit_micro", TASKS, img_size=(32, 32), moe_blocks=[1], num_experts=4, top_k=2,
                                  **SMALL),
            "mvit": create_model("mvit_micro", TASKS, img_size=(32, 32), **SMALL)}


def test_models_and_settings_are_timed_round_robin_in_eval_mode_and_restored():
    models = _models()
    calls = []
    for name, model in models.items():
        model.train()
        model.register_forward_pre_hook(lambda m, args, kwargs, name=name: calls.append(
            (name, tuple(kwargs["tasks"]), m.training)), with_kwargs=True)
    settings = [["semseg"], ["sal"], None]
    result = measure_latency_side_by_side(models, (32, 32), settings, repeats=3, warmup=1)
    one_round = [(n, tuple(t)) for n in ("m3vit", "mvit") for t in (["semseg"], ["sal"], ["semseg", "sal"])]
    assert [(n, t) for n, t, _ in calls] == one_round * 4  # warm-up round, then 3 timed rounds, each in order
    assert not any(training for _, _, training in calls) and all(m.training for m in models.values())
    for name in models:
        assert [r["tasks"] for r in result[name]] == [["semseg"], ["sal"], ["semseg", "sal"]]
        for r in result[name]:
            assert len(r["runs_ms"]) == 3 and r["min_ms"] <= r["median_ms"] and all(t > 0 for t in r["runs_ms"])


def test_measure_latency_is_the_one_model_case():
    model = _models()["mvit"]
    (only,) = measure_latency(model, (32, 32), [["sal"]], repeats=2)
    assert only["tasks"] == ["sal"] and len(only["runs_ms"]) == 2
