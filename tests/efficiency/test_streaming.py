"""Expert streaming: predictions equal the resident model's, idle experts are never read, at most two
expert buffers are live, rows are read without the whole tensor, and errors are clear (library and CLI)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_damage import address_space_cap, corrupt_config, corrupt_weights  # tests/checkpoint_damage.py
from m3vit.cli import main
from m3vit.efficiency import ExpertStreamer, StreamingMoE, load_streaming_model
from m3vit.efficiency.streaming import ExpertTensors, expert_weight_bytes, read_safetensors_layout
from m3vit.models import create_model, load_checkpoint, save_checkpoint
from m3vit.utils.errors import CheckpointError, M3ViTError

TASKS = {"semseg": 5, "depth": 1, "sal": 1}


def tiny_model(num_experts=4, router="multi_gate", dispatch="per_expert", seed=0, **overrides):
    """32 wide, 4 blocks, MoE in blocks 1 and 3, top-2: the smallest model with two MoE layers."""
    torch.manual_seed(seed)
    options = dict(embed_dim=32, depth=4, num_heads=2, moe_blocks=[1, 3], num_experts=num_experts, top_k=2,
                   head_channels=8, router=router, dispatch=dispatch)
    options.update(overrides)
    return create_model("m3vit_micro", TASKS, img_size=(32, 32), **options).eval()


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def checkpoint(tmp_path, model, name="ckpt"):
    return save_checkpoint(model, tmp_path / name)


def run(model, x, tasks=None):
    with torch.no_grad():
        return model(x, tasks=tasks)


# ---------------------------------------------------------------------------------------------
# Same predictions as the resident model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts, router", [(4, "multi_gate"), (8, "multi_gate"), (16, "multi_gate"),
                                                 (8, "task_conditioned"), (16, "shared")])
def test_streaming_equals_resident_bit_for_bit(tmp_path, num_experts, router):
    path = checkpoint(tmp_path, tiny_model(num_experts, router))
    resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
    x = images()
    for tasks in (None, ["depth"], ["sal", "semseg"]):
        want, got = run(resident, x, tasks), run(streaming, x, tasks)
        assert list(got) == list(want)
        for task in want:
            assert torch.equal(got[task], want[task]), (task, (got[task] - want[task]).abs().max())
        for ref, layer in zip(resident.moe_layers, streaming.moe_layers):
            assert isinstance(layer, StreamingMoE)
            for key in ("indices", "weights", "probs", "task_ids"):
                assert torch.equal(layer.last_routing[key], ref.last_routing[key])
            assert layer.last_routing["counts"] == ref.last_routing["counts"]
            assert layer.last_loaded == tuple(e for e, c in enumerate(ref.last_routing["counts"]) if c)


def test_streaming_matches_batched_dispatch_within_rounding(tmp_path):
    """A resident model whose dispatch is "batched" runs the same sums as padded batched GEMMs: the
    routing is identical and the outputs differ only by float32 rounding of a different GEMM kernel."""
    path = checkpoint(tmp_path, tiny_model(8, dispatch="batched"))
    resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
    x = images(3)
    want, got = run(resident, x), run(streaming, x)
    for task in want:
        torch.testing.assert_close(got[task], want[task], rtol=1e-5, atol=1e-6)
    for ref, layer in zip(resident.moe_layers, streaming.moe_layers):
        assert torch.equal(layer.last_routing["indices"], ref.last_routing["indices"])


def test_streaming_from_a_half_precision_checkpoint(tmp_path):
    """Weights stored as float16 are widened to the model's float32 on both paths: still identical."""
    path = checkpoint(tmp_path, tiny_model(4).half())
    resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
    assert streaming.expert_streamer.dtype == torch.float16
    x = images()
    want, got = run(resident, x), run(streaming, x)
    assert all(torch.equal(got[t], want[t]) for t in want)


def _exclude_experts(model, allowed: set[int]) -> None:
    """Bias every MoE layer so that only ``allowed`` experts can win: the tokens entering the router
    are ``LayerNorm`` outputs, whose shift along the first axis is set to 20, and the gate rows of the
    other experts point against that axis (logit about -20 instead of +20)."""
    for block in model.backbone.blocks:
        if not block.is_moe:
            continue
        with torch.no_grad():
            block.norm2.bias.zero_()
            block.norm2.bias[0] = 20.0
            router = block.mlp.router
            gate = router.weight if hasattr(router, "weight") else router.gate.weight  # [T, E, D] or [E, D(+emb)]
            for e in range(block.mlp.num_experts):
                gate[..., e, 0] = 1.0 if e in allowed else -1.0


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_experts_without_tokens_are_never_read(tmp_path, router):
    allowed = {1, 4, 6}
    model = tiny_model(8, router)
    _exclude_experts(model, allowed)
    path = checkpoint(tmp_path, model)
    resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
    streamer = streaming.expert_streamer
    x = images()
    want = run(resident, x)
    streamer.stats.reset()
    got = run(streaming, x)
    assert all(torch.equal(got[t], want[t]) for t in want)
    busy_total = 0
    for layer, ref in zip(streaming.moe_layers, resident.moe_layers):
        counts = ref.last_routing["counts"]
        busy = {e for e, c in enumerate(counts) if c}
        assert busy <= allowed and len(busy) >= 2, counts  # some experts got no token, several did
        assert all(counts[e] == 0 for e in set(range(8)) - allowed)
        assert set(layer.last_loaded) == busy and list(layer.last_loaded) == sorted(busy)
        busy_total += len(busy)
    expert_bytes = 4 * (32 * 32 + 32 + 32 * 32 + 32)
    assert streamer.stats.loads == busy_total
    assert streamer.stats.bytes_read == busy_total * expert_bytes


def test_a_layer_where_one_expert_takes_every_token(tmp_path):
    """top-1 with a single allowed expert: one read per layer, nothing to prefetch, same output."""
    model = tiny_model(8, top_k=1)
    _exclude_experts(model, {3})
    path = checkpoint(tmp_path, model)
    resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
    streaming.expert_streamer.stats.reset()
    want, got = run(resident, images()), run(streaming, images())
    assert all(torch.equal(got[t], want[t]) for t in want)
    assert [layer.last_loaded for layer in streaming.moe_layers] == [(3,), (3,)]
    assert streaming.expert_streamer.stats.loads == 2 and streaming.expert_streamer.stats.peak_live == 1


def test_prefetch_by_default_only_where_a_core_is_left_for_the_reader(monkeypatch, tmp_path):
    from m3vit.efficiency import streaming

    threads = torch.get_num_threads()
    monkeypatch.setattr(streaming, "usable_cpus", lambda: threads)  # every core computes: no reader thread
    assert not streaming.default_prefetch("cpu") and streaming.default_prefetch("cuda")
    monkeypatch.setattr(streaming, "usable_cpus", lambda: threads + 1)
    assert streaming.default_prefetch("cpu")
    monkeypatch.setattr(streaming, "usable_cpus", lambda: threads)
    path = checkpoint(tmp_path, tiny_model(8))
    assert not load_streaming_model(path).expert_streamer.prefetch
    assert load_streaming_model(path, prefetch=True).expert_streamer.prefetch
    assert 1 <= streaming.usable_cpus() <= (os.cpu_count() or 1)


def test_without_prefetch_the_output_is_the_same(tmp_path):
    path = checkpoint(tmp_path, tiny_model(8))
    x = images()
    a, b = run(load_streaming_model(path, prefetch=True), x), run(load_streaming_model(path, prefetch=False), x)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_capacity_factor_drops_the_same_pairs(tmp_path):
    path = checkpoint(tmp_path, tiny_model(4, capacity_factor=0.5))
    resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
    want, got = run(resident, images()), run(streaming, images())
    assert resident.moe_layers[0].last_routing["dropped"] > 0
    assert all(torch.equal(got[t], want[t]) for t in want)
    dropped = [m.last_routing["dropped"] for m in streaming.moe_layers]
    assert dropped == [m.last_routing["dropped"] for m in resident.moe_layers]


# ---------------------------------------------------------------------------------------------
# Memory: two buffers, no expert tensor in the model, rows read alone
# ---------------------------------------------------------------------------------------------
def test_streaming_model_holds_no_expert_tensor(tmp_path):
    model = tiny_model(16)
    path = checkpoint(tmp_path, model)
    total, experts = expert_weight_bytes(model)
    streaming = load_streaming_model(path, prefetch=True)
    s_total, s_experts = expert_weight_bytes(streaming)
    assert experts > 0 and s_experts == 0
    assert s_total == total - experts  # everything but the experts is resident
    names = set(streaming.state_dict())
    assert not any(n.endswith(("mlp.w1", "mlp.b1", "mlp.w2", "mlp.b2")) for n in names)
    one_expert = 4 * (32 * 32 * 2 + 32 * 2)
    assert streaming.expert_streamer.buffer_bytes == 2 * one_expert


def test_at_most_two_expert_buffers_are_live(tmp_path, monkeypatch):
    """A slow reader makes the compute wait: the live count, sampled at every read and every compute,
    never exceeds two, and it reaches two (the next expert is read while the current one computes)."""
    path = checkpoint(tmp_path, tiny_model(16))
    streaming = load_streaming_model(path, prefetch=True)
    streamer = streaming.expert_streamer
    samples, threads = [], set()
    original = ExpertStreamer._read

    def slow_read(self, tensors, expert, slot):
        samples.append(self.stats.live)
        threads.add(threading.current_thread().name)
        time.sleep(0.002)
        return original(self, tensors, expert, slot)

    monkeypatch.setattr(ExpertStreamer, "_read", slow_read)
    streamer.stats.reset()
    run(streaming, images(4))
    assert streamer.stats.loads == len(samples) > 4
    assert max(samples) <= 2 and streamer.stats.peak_live == 2
    assert streamer.stats.live == 0  # every buffer released after the forward
    assert threads == {n for n in threads if n.startswith("m3vit-expert-reader")}  # read in the background


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    """A safetensors file with one layer's stacked experts (6 experts, D=8, H=12) and an unrelated tensor."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"layer.w1": torch.randn(6, 8, 12, generator=gen), "layer.b1": torch.randn(6, 12, generator=gen),
               "layer.w2": torch.randn(6, 12, 8, generator=gen), "layer.b2": torch.randn(6, 8, generator=gen),
               "other": torch.arange(10)}
    path = tmp_path_factory.mktemp("experts") / "experts.safetensors"
    save_file(tensors, str(path))
    return path


def test_layout_reads_the_same_bytes_as_safetensors(expert_file):
    layout = read_safetensors_layout(expert_file)
    data = expert_file.read_bytes()
    with safe_open(str(expert_file), "pt") as f:
        assert set(layout) == set(f.keys())
        for name, entry in layout.items():
            ref = f.get_tensor(name)
            assert entry.shape == tuple(ref.shape) and entry.dtype == ref.dtype
            got = torch.frombuffer(bytearray(data[entry.begin:entry.end]), dtype=entry.dtype).reshape(entry.shape)
            assert torch.equal(got, ref)


@settings(max_examples=15, deadline=None)
@given(experts=st.lists(st.integers(0, 5), min_size=0, max_size=8), prefetch=st.booleans())
def test_stream_yields_each_expert_from_one_of_two_buffers(expert_file, experts, prefetch):
    layout = read_safetensors_layout(expert_file)
    tensors = ExpertTensors("layer", *(layout[f"layer.{p}"] for p in ("w1", "b1", "w2", "b2")))
    streamer = ExpertStreamer(expert_file, 8, 12, torch.float32, prefetch=prefetch)
    pointers = streamer.buffer_pointers()
    seen = []
    with safe_open(str(expert_file), "pt") as f:
        for expert, w in streamer.stream(tensors, experts):
            seen.append(expert)
            assert streamer.stats.live <= 2
            for name in ("w1", "b1", "w2", "b2"):
                t = getattr(w, name)
                assert t.data_ptr() in pointers
                assert torch.equal(t, f.get_slice(f"layer.{name}")[expert])  # independent reader
    assert seen == experts and streamer.stats.live == 0 and streamer.stats.loads == len(experts)
    assert streamer.stats.peak_live == min(len(experts), 2)
    row_bytes = 4 * (8 * 12 * 2 + 12 + 8)
    assert streamer.stats.bytes_read == row_bytes * len(experts)  # one expert's rows per read, never a whole tensor
    streamer.close()


def test_an_error_in_the_compute_releases_both_buffers(expert_file):
    layout = read_safetensors_layout(expert_file)
    tensors = ExpertTensors("layer", *(layout[f"layer.{p}"] for p in ("w1", "b1", "w2", "b2")))
    streamer = ExpertStreamer(expert_file, 8, 12, torch.float32)
    with pytest.raises(ZeroDivisionError):
        for _ in streamer.stream(tensors, [0, 1, 2, 3]):
            1 / 0
    assert streamer.stats.live == 0
    assert [e for e, _ in streamer.stream(tensors, [2, 5])] == [2, 5]  # still usable
    streamer.close()
    with pytest.raises(RuntimeError, match="closed"):
        list(streamer.stream(tensors, [0]))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_training_mode_is_refused(tmp_path):
    streaming = load_streaming_model(checkpoint(tmp_path, tiny_model()), prefetch=True)
    streaming.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        streaming(images())


def test_compile_model_refuses_a_streaming_model(tmp_path):
    from m3vit.nn import compile_model
    from m3vit.utils.errors import InputError

    streaming = load_streaming_model(checkpoint(tmp_path, tiny_model()), prefetch=True)
    with pytest.raises(InputError, match="streams its experts"):
        compile_model(streaming)
    streaming.expert_streamer.close()


def test_missing_and_broken_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_streaming_model(tmp_path / "nowhere")
    path = checkpoint(tmp_path, tiny_model())
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_streaming_model(path)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_streaming_model(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_streaming_model(path)


def test_dense_model_and_mismatched_weights_are_refused(tmp_path):
    dense = create_model("mvit_micro", TASKS, img_size=(32, 32), embed_dim=32, depth=2, num_heads=2, head_channels=8)
    with pytest.raises(ValueError, match="dense"):
        load_streaming_model(save_checkpoint(dense, tmp_path / "dense"))
    small, big = tiny_model(4), tiny_model(8)
    path = checkpoint(tmp_path, small, "mixed")
    save_checkpoint(big, tmp_path / "big")
    (path / "model.safetensors").write_bytes((tmp_path / "big" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match config.yaml"):  # ConfigError is a ValueError
        load_streaming_model(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_equals_resident(tmp_path):
    path = checkpoint(tmp_path, tiny_model(8))
    resident, streaming = load_checkpoint(path, map_location="cuda"), load_streaming_model(path, map_location="cuda")
    x = images().cuda()
    want, got = run(resident, x), run(streaming, x)
    assert all(torch.equal(got[t], want[t]) for t in want)
    assert streaming.expert_streamer.stats.peak_live == 2


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_infer_stream_experts_writes_the_same_files(tmp_path, capsys):
    path = checkpoint(tmp_path, tiny_model(8))
    rng = np.random.default_rng(0)
    pictures = []
    for name, shape in (("a.png", (40, 52, 3)), ("b.png", (32, 32, 3))):
        pictures.append(str(tmp_path / name))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(pictures[-1])
    outputs = {}
    for mode, extra in (("resident", []), ("streaming", ["--stream-experts"])):
        out = tmp_path / mode
        argv = ["infer", "--checkpoint", str(path), "--task", "semseg", "--task", "depth", "--npy",
                "--out", str(out), "--device", "cpu", *extra, *pictures]
        assert main(argv) == 0, capsys.readouterr().err
        manifest = json.loads((out / ".m3vit-output.json").read_text())
        outputs[mode] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".m3vit-output.json"}
        outputs[mode]["manifest files"] = manifest["files"]  # its stamps hold each run's own file times
    assert len(outputs["resident"]) == 9  # 2 images x 2 tasks x (png + npy), and the output manifest
    assert outputs["streaming"] == outputs["resident"]


def test_cli_infer_stream_experts_on_a_dense_checkpoint_is_one_line(tmp_path, capsys):
    dense = create_model("mvit_micro", TASKS, img_size=(32, 32), embed_dim=32, depth=2, num_heads=2, head_channels=8)
    path = save_checkpoint(dense, tmp_path / "dense")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = main(["infer", "--checkpoint", str(path), "--task", "depth", "--out", str(tmp_path / "o"),
                 "--stream-experts", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "dense" in err


def test_a_checkpoint_holding_a_subset_of_the_experts(tmp_path):
    """An extracted single-task model (``expert_subsets``): its MoE layers hold some of the router's
    experts and pick among those; streaming reads the held rows and routes the same way."""
    from m3vit.models import ModelConfig

    if "expert_subsets" not in ModelConfig.keys():
        pytest.skip("this tree has no per-task extraction (ModelConfig.expert_subsets)")
    for gate_softmax in ("all", "kept"):
        model = tiny_model(8, expert_subsets={1: [0, 2, 5], 3: [1, 3, 4, 7]}, gate_softmax=gate_softmax)
        path = checkpoint(tmp_path, model, f"subset-{gate_softmax}")
        resident, streaming = load_checkpoint(path), load_streaming_model(path, prefetch=True)
        assert [m.num_experts for m in streaming.moe_layers] == [3, 4]
        want, got = run(resident, images()), run(streaming, images())
        assert all(torch.equal(got[t], want[t]) for t in want)
        for ref, layer in zip(resident.moe_layers, streaming.moe_layers):
            assert torch.equal(layer.last_routing["indices"], ref.last_routing["indices"])


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: the same verification as load_checkpoint, before any byte is read as a weight
# ---------------------------------------------------------------------------------------------
def test_negative_data_offsets_are_refused_not_read_from_the_header(tmp_path):
    """A hand-written header moves one tensor's range to [-4, 0]: four bytes before the data, inside the JSON
    header. The byte count still matches its shape, so a reader that only checked sizes would read header
    text as that weight and load without complaint."""
    path = checkpoint(tmp_path, tiny_model())
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    name = "heads.depth.classifier.bias"  # one float32
    header[name]["data_offsets"] = [-4, 0]
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data)
    with pytest.raises(CheckpointError, match=rf"^{weights}: negative data_offsets \[-4, 0\] for tensor '{name}'"):
        load_streaming_model(path)


def test_a_config_that_does_not_match_the_weights_is_refused_before_streaming(tmp_path):
    path = checkpoint(tmp_path, tiny_model(4))
    meta = yaml.safe_load((path / "config.yaml").read_text())
    meta["model"]["embed_dim"] = 300000
    (path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match=r"config.yaml: model: embed_dim must be at most 65536, got 300000"):
        load_streaming_model(path)
    meta["model"].update(embed_dim=32, tasks={"semseg": 5, "depth": 2, "sal": 1})
    (path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match=r"heads.depth.classifier.weight is \[1, 8, 1, 1\] in the file, "
                                              r"\[2, 8, 1, 1\] in the config"):
        load_streaming_model(path)


@pytest.fixture(scope="module")
def valid_moe_checkpoint(tmp_path_factory):
    directory = checkpoint(tmp_path_factory.mktemp("valid"), tiny_model(4))
    return (directory / "model.safetensors").read_bytes(), (directory / "config.yaml").read_text()


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 120)) // 3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_load_streaming_model_gives_a_model_or_an_m3vit_error(valid_moe_checkpoint, data):
    """The corruptions of tests/models/test_checkpoint.py's fuzz test, through the streaming loader."""
    weights, config = valid_moe_checkpoint
    damage_weights, damage_config = data.draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "model.safetensors").write_bytes(corrupt_weights(data.draw, weights) if damage_weights
                                                      else weights)
        (directory / "config.yaml").write_bytes(corrupt_config(data.draw, config) if damage_config
                                                else config.encode())
        try:
            with address_space_cap():
                model = load_streaming_model(directory)
        except M3ViTError as exc:
            assert "\n" not in str(exc).strip()
            return
        try:
            with torch.no_grad():
                assert set(model(images(1))) == set(model.tasks)
        finally:
            model.expert_streamer.close()
