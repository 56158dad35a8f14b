"""Model zoo, tier catalog and HeteroFL slicing: shapes, names, init, graphs, the edge zoo's tiers and export.

The zoo builds full-width graphs; every tier here is cut from them the one way (tests/tiers.py).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.special
from pydantic import ValidationError

from models.cli import configure_parser, run
from models.export import INDEX_NAME, MANIFEST_NAME, export_all, zoo_card
from models.manifest import STATISTICS_FILE, STEP_FILE, ExportIndex, TierManifest
from models.onnx_import import SUPPORTED_OPS
from models.ort_training import captured_native_stderr, load_training_api
from models.slicing import slice_params
from models.step_graph import step_graph_io
from models.tier_graph import cut_forward, forward_macs, initializer_arrays
from models.tiers import TIER_RATES, scaled_width, tier_rate
from models.zoo import ModelSpec, build_forward, init_global_params
from protocol.blocks import leading_slices
from tests.tiers import zoo_forward, zoo_plan, zoo_shapes, zoo_statistics, zoo_tier, zoo_weights

SPECS = [
    ModelSpec(arch="mlp"),
    ModelSpec(arch="mlp", image_size=28),
    ModelSpec(arch="cnn"),
    ModelSpec(arch="cnn", image_size=28),
    ModelSpec(arch="cnn", batch_norm=True),
    ModelSpec(arch="mlp", batch_norm=True),
]


def _expected_shapes(spec: ModelSpec, rate: float) -> dict[str, tuple[int, ...]]:
    """The HeteroFL shapes written out by hand, in graph order, independent of the zoo and the width analysis."""
    w = [max(1, math.ceil(rate * c)) for c in spec.widths]
    k, bn = spec.num_classes, spec.batch_norm
    shapes: dict[str, tuple[int, ...]] = {}

    def bn_block(i: int, c: int) -> None:
        if bn:
            shapes.update({f"bn{i}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})

    if spec.arch == "mlp":
        fan_in = spec.image_size**2
        for i, c in enumerate(w, start=1):
            shapes[f"fc{i}.weight"] = (c, fan_in)
            if not bn:
                shapes[f"fc{i}.bias"] = (c,)
            bn_block(i, c)
            fan_in = c
        shapes[f"fc{len(w) + 1}.weight"], shapes[f"fc{len(w) + 1}.bias"] = (k, fan_in), (k,)
        return shapes
    shapes["conv1.weight"] = (w[0], 1, 3, 3)
    if not bn:
        shapes["conv1.bias"] = (w[0],)
    bn_block(1, w[0])
    shapes["conv2.weight"] = (w[1], w[0], 3, 3)
    if not bn:
        shapes["conv2.bias"] = (w[1],)
    bn_block(2, w[1])
    side = spec.image_size // 4
    shapes["fc1.weight"], shapes["fc1.bias"] = (w[2], w[1] * side * side), (w[2],)
    shapes["fc2.weight"], shapes["fc2.bias"] = (k, w[2]), (k,)
    return shapes


def test_tier_catalog() -> None:
    assert dict(TIER_RATES) == {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
    with pytest.raises(TypeError):
        TIER_RATES["f"] = 0.01  # type: ignore[index]
    assert tier_rate("c") == 0.25


def test_unknown_tier_names_known_tiers() -> None:
    with pytest.raises(ValueError, match=r"unknown tier 'z'.*a=1.*e=0\.0625"):
        tier_rate("z")


@pytest.mark.parametrize(
    ("width", "rate", "expected"),
    [(256, 1.0, 256), (256, 0.0625, 16), (10, 0.0625, 1), (3, 0.5, 2), (1, 0.0625, 1), (30, 0.1, 3)],
)
def test_scaled_width(width: int, rate: float, expected: int) -> None:
    assert scaled_width(width, rate) == expected


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("tier", list(TIER_RATES))
def test_param_shapes_per_tier(spec: ModelSpec, tier: str) -> None:
    shapes = zoo_shapes(spec, tier_rate(tier))
    assert shapes == _expected_shapes(spec, tier_rate(tier))
    assert list(shapes) == list(zoo_shapes(spec))  # same names, same order on every tier


def test_concrete_shapes() -> None:
    assert zoo_shapes(ModelSpec(arch="cnn", image_size=28), 0.125) == {
        "conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,),
        "conv2.weight": (8, 4, 3, 3), "conv2.bias": (8,),
        "fc1.weight": (16, 8 * 7 * 7), "fc1.bias": (16,),
        "fc2.weight": (10, 16), "fc2.bias": (10,),
    }  # fmt: skip
    mlp = ModelSpec(arch="mlp")  # 64 -> 256 -> 256 -> 10
    assert zoo_shapes(mlp, 1.0) == {
        "fc1.weight": (256, 64), "fc1.bias": (256,),
        "fc2.weight": (256, 256), "fc2.bias": (256,),
        "fc3.weight": (10, 256), "fc3.bias": (10,),
    }  # fmt: skip
    assert zoo_shapes(mlp, 0.0625) == {
        "fc1.weight": (16, 64), "fc1.bias": (16,),
        "fc2.weight": (16, 16), "fc2.bias": (16,),
        "fc3.weight": (10, 16), "fc3.bias": (10,),
    }  # fmt: skip


def test_trainable_and_frozen_names() -> None:
    bn = ModelSpec(arch="cnn", batch_norm=True)
    plan = zoo_plan(bn)
    assert plan.frozen == ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var")
    assert [*plan.trainable, *plan.frozen] != list(init_global_params(bn))  # the graph interleaves them
    assert sorted([*plan.trainable, *plan.frozen]) == sorted(init_global_params(bn))
    assert zoo_plan(ModelSpec(arch="mlp")).frozen == ()


def test_spec_names_and_validation() -> None:
    assert ModelSpec(arch="mlp").name == "mlp8"
    assert ModelSpec(arch="cnn", image_size=28, batch_norm=True).name == "cnn28-bn"
    assert ModelSpec(arch="mlp", hidden=(64, 32)).name == "mlp8-h64x32"
    with pytest.raises(ValidationError):
        ModelSpec(arch="cnn", hidden=(32,))
    with pytest.raises(ValidationError):
        ModelSpec(arch="rnn")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ModelSpec(arch="mlp").arch = "cnn"  # type: ignore[misc]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_init_is_deterministic_pytorch_like(spec: ModelSpec) -> None:
    a, b = init_global_params(spec), init_global_params(spec)
    other = init_global_params(spec.model_copy(update={"seed": 1}))
    assert list(a) == list(_expected_shapes(spec, 1.0))  # graph order
    for name, arr in a.items():
        assert arr.dtype == np.float32 and arr.shape == _expected_shapes(spec, 1.0)[name]
        np.testing.assert_array_equal(arr, b[name])
    w = a["fc1.weight"]
    assert np.abs(w).max() <= 1 / math.sqrt(w.shape[1]) and not np.array_equal(w, other["fc1.weight"])
    if spec.batch_norm:
        assert (a["bn1.weight"] == 1).all() and (a["bn1.bias"] == 0).all()
        assert (a["bn1.running_mean"] == 0).all() and (a["bn1.running_var"] == 1).all()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_kaiming_init_widens_the_layers_a_relu_follows_by_sqrt_6(tmp_path: Path, arch: str) -> None:
    """init "kaiming": the same draws as PyTorch's default, the weights of every layer but the output sqrt(6) wider
    (He et al.'s U(+-sqrt(6/fan_in))); biases and the output layer unchanged; `tierfl export --init` writes it into the
    recipe; other archs refuse it."""
    spec = ModelSpec(arch=arch, image_size=8)
    pytorch, kaiming = init_global_params(spec), init_global_params(spec.model_copy(update={"init": "kaiming"}))
    output = list(pytorch)[-2]  # the output layer's weight, then its bias
    assert output.endswith(".weight")
    for name, value in pytorch.items():
        gain = math.sqrt(6) if name.endswith(".weight") and name != output else 1.0
        np.testing.assert_allclose(kaiming[name], value * np.float32(gain), rtol=1e-6, err_msg=name)
        assert np.abs(kaiming[name]).max() <= gain / math.sqrt(np.prod(value.shape[1:])) + 1e-7
    with pytest.raises(ValidationError, match="kaiming' is for mlp and cnn"):
        ModelSpec(arch="preresnet", init="kaiming")
    parser = argparse.ArgumentParser(prog="tierfl export")
    configure_parser(parser)
    assert "kaiming: He et al." in parser.format_help()
    assert run(parser.parse_args(["--arch", arch, "--init", "kaiming", "--tiers", "a", "--out", str(tmp_path)])) == 0
    assert ExportIndex.load(tmp_path / INDEX_NAME).model.recipe.init == "kaiming"


def test_slicing_round_trip() -> None:
    spec = ModelSpec(arch="cnn", batch_norm=True)
    glob = init_global_params(spec)
    shapes = zoo_shapes(spec, 0.25)
    tier = slice_params(glob, shapes)
    restored = {n: a.copy() for n, a in glob.items()}
    for name, arr in tier.items():
        assert arr.flags.c_contiguous and not np.shares_memory(arr, glob[name])
        restored[name][leading_slices(arr.shape)] = arr
    for name in glob:
        np.testing.assert_array_equal(restored[name], glob[name])
    assert tier["fc1.weight"].shape == (32, 16 * 2 * 2)
    np.testing.assert_array_equal(tier["conv2.weight"], glob["conv2.weight"][:16, :8])


def test_slicing_rejects_bad_shapes() -> None:
    glob = {"w": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match="does not fit"):
        slice_params(glob, {"w": (5, 4)})
    with pytest.raises(KeyError):
        slice_params(glob, {"v": (1,)})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("tier", ["a", "e"])
def test_forward_graph_valid_and_runs(spec: ModelSpec, tier: str) -> None:
    rate = tier_rate(tier)
    params = zoo_weights(spec, rate)
    model = zoo_tier(spec, rate)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and model.opset_import[0].version == 17
    assert [t.name for t in model.graph.initializer] == list(zoo_shapes(spec, rate))
    x = np.random.default_rng(0).random((3, 1, spec.image_size, spec.image_size), dtype=np.float32)
    (logits,) = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})
    assert logits.shape == (3, spec.num_classes) and logits.dtype == np.float32
    if rate == 1.0:  # tier a computes the zoo's full-width graph
        full = build_forward(spec, init_global_params(spec))
        np.testing.assert_array_equal(ort.InferenceSession(full.SerializeToString()).run(None, {"input": x})[0], logits)

    as_inputs = zoo_tier(spec, rate, params_as_inputs=True)
    onnx.checker.check_model(as_inputs, full_check=True)
    assert len(as_inputs.graph.initializer) == 0
    assert [i.name for i in as_inputs.graph.input] == ["input", *zoo_shapes(spec, rate)]
    (fed,) = ort.InferenceSession(as_inputs.SerializeToString()).run(None, {"input": x, **params})
    np.testing.assert_allclose(fed, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec,hidden_layers", [(SPECS[0], 2), (SPECS[2], 3), (SPECS[4], 3), (SPECS[5], 2)], ids=lambda s: str(s))
def test_scaler_input_multiplies_every_hidden_layer(spec: ModelSpec, hidden_layers: int) -> None:
    rate = 0.25
    plain, scaled = zoo_tier(spec, rate), zoo_tier(spec, rate, scaler=True)
    onnx.checker.check_model(scaled, full_check=True)
    assert sum(node.op_type == "Mul" for node in scaled.graph.node) == hidden_layers
    x = np.random.default_rng(0).random((4, 1, spec.image_size, spec.image_size), dtype=np.float32)
    (expected,) = ort.InferenceSession(plain.SerializeToString()).run(None, {"input": x})
    session = ort.InferenceSession(scaled.SerializeToString())
    (at_one,) = session.run(None, {"input": x, "scale": np.array([1.0], np.float32)})
    np.testing.assert_allclose(at_one, expected, rtol=1e-5, atol=1e-6)  # evaluation feeds 1: the plain model
    (at_four,) = session.run(None, {"input": x, "scale": np.array([4.0], np.float32)})
    assert not np.allclose(at_four, expected)


def test_forward_macs_shrink_with_the_tier() -> None:
    mlp = ModelSpec(arch="mlp")
    assert forward_macs(zoo_tier(mlp, 1.0)) == 64 * 256 + 256 * 256 + 256 * 10
    assert forward_macs(zoo_tier(mlp, 0.0625)) == 64 * 16 + 16 * 16 + 16 * 10
    cnn = ModelSpec(arch="cnn", image_size=28)
    macs = [forward_macs(zoo_tier(cnn, r)) for r in TIER_RATES.values()]
    # conv1 1->32 at 28x28, conv2 32->64 at 14x14 (3x3 kernels), fc1 64*7*7 -> 128, fc2 128 -> 10
    assert macs[0] == 32 * 9 * 28 * 28 + 32 * 64 * 9 * 14 * 14 + 64 * 7 * 7 * 128 + 128 * 10
    assert macs == sorted(macs, reverse=True) and macs[0] > 100 * macs[-1]


def test_forward_rejects_wrong_params() -> None:
    spec = ModelSpec(arch="mlp")
    with pytest.raises(ValueError, match="expected shape"):
        build_forward(spec, zoo_weights(spec, 0.5))  # a tier's weights are not the full-width model's
    params = init_global_params(spec)
    del params["fc3.bias"]
    with pytest.raises(ValueError, match="missing"):
        build_forward(spec, params)


# ---- the edge zoo: preresnet, mobilenet, conv1d, transformer (written at rate 1, tiers cut generically) --------

EDGE = [
    ModelSpec(arch="preresnet"),
    ModelSpec(arch="mobilenet"),
    ModelSpec(arch="conv1d"),
    ModelSpec(arch="transformer"),
]
EDGE_VARIANTS = [  # other inputs: 1-channel 28px images, an IMU window, 8 tokens of 6 features, odd widths
    ModelSpec(arch="preresnet", channels=1, image_size=28, hidden=(8, 12), num_classes=4),
    ModelSpec(arch="mobilenet", image_size=8, hidden=(6, 10, 20)),
    ModelSpec(arch="conv1d", channels=6, length=128, hidden=(24, 40), num_classes=6),
    ModelSpec(arch="transformer", channels=6, length=8, hidden=(24, 40), num_classes=5),
]
EXPECTED_GROUPS = {  # the width groups the analysis must find (all cut), named by their first parameter axis
    "preresnet32": {"stem.weight[0]": 16, "stage1.conv1.weight[0]": 16, "stage2.conv1.weight[0]": 32,
                    "stage2.conv2.weight[0]": 32, "stage3.conv1.weight[0]": 64, "stage3.conv2.weight[0]": 64},
    "mobilenet32": {"stem.conv.weight[0]": 16, "block1.se.reduce.weight[0]": 4, "block1.pointwise.weight[0]": 32,
                    "block2.se.reduce.weight[0]": 8, "block2.pointwise.weight[0]": 64,
                    "block3.se.reduce.weight[0]": 16, "block3.pointwise.weight[0]": 128},
    "conv1d-40x49": {"conv1.weight[0]": 32, "conv2.weight[0]": 64, "conv3.weight[0]": 64},
    "transformer-16x16": {"embed.weight[0]": 32, "attn.q.weight[0]": 32, "attn.v.weight[0]": 32,
                          "mlp.fc1.weight[0]": 64},
}


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1, groups: int = 1) -> np.ndarray:
    """PyTorch's Conv1d/Conv2d with padding k // 2, in float64."""
    kernel = w.shape[2:]
    spatial = tuple(range(2, x.ndim))
    padded = np.pad(x, [(0, 0), (0, 0), *[(k // 2, k // 2) for k in kernel]])
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=spatial)
    windows = windows[(slice(None), slice(None), *[slice(None, None, stride)] * len(kernel))]
    where, taps = "hw"[: len(kernel)], "ij"[: len(kernel)]
    cin, cout = x.shape[1] // groups, w.shape[0] // groups
    out = np.concatenate([np.einsum(f"nc{where}{taps},oc{taps}->no{where}", windows[:, g * cin:(g + 1) * cin],
                                    w[g * cout:(g + 1) * cout]) for g in range(groups)], axis=1)
    return out if b is None else out + b.reshape(-1, *[1] * len(kernel))


def _bn(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    """BatchNorm with running statistics over axis 1."""
    view = (-1, *[1] * (x.ndim - 2))
    mean, var = p[f"{name}.running_mean"].reshape(view), p[f"{name}.running_var"].reshape(view)
    return (x - mean) / np.sqrt(var + 1e-5) * p[f"{name}.weight"].reshape(view) + p[f"{name}.bias"].reshape(view)


def _ln(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    """LayerNorm over the last axis."""
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _fc(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 6)


def _reference(spec: ModelSpec, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The logits each arch computes, written from its description with numpy (any width: read off `p`)."""
    p = {n: a.astype(np.float64) for n, a in p.items()}
    if spec.arch == "preresnet":
        h = _conv(x, p["stem.weight"])
        for i in range(1, len(spec.widths) + 1):
            s = f"stage{i}"
            a = _relu(_bn(h, p, f"{s}.bn1"))
            stride = 1 if i == 1 else 2
            skip = _conv(a, p[f"{s}.shortcut.weight"], stride=stride) if f"{s}.shortcut.weight" in p else h
            h = _relu(_bn(_conv(a, p[f"{s}.conv1.weight"], stride=stride), p, f"{s}.bn2"))
            h = _conv(h, p[f"{s}.conv2.weight"])
            h = h + skip
        return _fc(_relu(_bn(h, p, "bn")).mean(axis=(2, 3)), p, "fc")
    if spec.arch == "mobilenet":
        h = _relu6(_bn(_conv(x, p["stem.conv.weight"], stride=2), p, "stem.bn"))
        for i in range(1, len(spec.widths)):
            b = f"block{i}"
            h = _relu6(_bn(_conv(h, p[f"{b}.depthwise.weight"], stride=1 if i == 1 else 2, groups=h.shape[1]), p,
                           f"{b}.bn1"))
            s = _relu(_conv(h.mean(axis=(2, 3), keepdims=True), p[f"{b}.se.reduce.weight"], p[f"{b}.se.reduce.bias"]))
            h = h * np.clip(_conv(s, p[f"{b}.se.expand.weight"], p[f"{b}.se.expand.bias"]) / 6 + 0.5, 0, 1)
            h = _relu6(_bn(_conv(h, p[f"{b}.pointwise.weight"]), p, f"{b}.bn2"))
        return _fc(h.mean(axis=(2, 3)), p, "fc")
    if spec.arch == "conv1d":
        h = x
        for i in range(1, len(spec.widths) + 1):
            h = _relu(_bn(_conv(h, p[f"conv{i}.weight"]), p, f"bn{i}"))
            n, c, t = h.shape
            h = h[:, :, : t // 2 * 2].reshape(n, c, t // 2, 2).max(-1)
        return _fc(h.mean(axis=2), p, "fc")
    h = _fc(x, p, "embed") + p["pos.weight"]
    a = _ln(h, p, "norm1")
    q, k, v = (_fc(a, p, f"attn.{n}") for n in "qkv")
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(spec.widths[0])  # the full width's scale at every tier
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    h = h + _fc(weights / weights.sum(-1, keepdims=True) @ v, p, "attn.out")
    m = _fc(_ln(h, p, "norm2"), p, "mlp.fc1")
    h = h + _fc(m * 0.5 * (1 + scipy.special.erf(m / math.sqrt(2))), p, "mlp.fc2")
    return _fc(_ln(h, p, "norm").mean(axis=1), p, "fc")


def _randomized(params: dict[str, np.ndarray], seed: int = 3) -> dict[str, np.ndarray]:
    """Global weights that carry a signal: normalization parameters and statistics away from identity, and
    weights scaled to Kaiming's variance (PyTorch's init keeps a fresh model's logits almost input-independent)."""
    rng = np.random.default_rng(seed)
    out = dict(params)
    for name, value in params.items():
        layer, kind = name.rsplit(".", 1)
        if not layer.split(".")[-1].startswith(("bn", "norm")):
            out[name] = value * np.float32(math.sqrt(6)) if kind == "weight" else value
        elif kind in ("running_mean", "bias"):
            out[name] = rng.normal(0, 0.2, value.shape).astype(np.float32)
        else:
            out[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    return out


def test_edge_specs_defaults_shapes_and_names() -> None:
    assert [(s.name, s.input_shape, s.batch_norm) for s in EDGE] == [
        ("preresnet32", (3, 32, 32), True), ("mobilenet32", (3, 32, 32), True),
        ("conv1d-40x49", (40, 49), True), ("transformer-16x16", (16, 16), False)]
    assert [s.name for s in EDGE_VARIANTS] == ["preresnet28-c1-h8x12-k4", "mobilenet8-h6x10x20",
                                               "conv1d-6x128-h24x40-k6", "transformer-8x6-h24x40-k5"]
    assert ModelSpec(arch="transformer", channels=6, length=8).input_shape == (8, 6)  # tokens x features
    assert ModelSpec(arch="mlp").input_shape == (1, 8, 8)
    assert ModelSpec(arch="cnn", image_size=28).input_shape == (1, 28, 28)
    assert ModelSpec(arch="mlp").model_dump()["image_size"] == 8 and ModelSpec(arch="conv1d").image_size is None
    for spec in EDGE + EDGE_VARIANTS + SPECS:
        assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    # a recipe written before the new fields existed reads as the same model
    assert ModelSpec.model_validate({"arch": "cnn", "image_size": 28, "hidden": None, "batch_norm": True, "seed": 0,
                                     "num_classes": 10}) == ModelSpec(arch="cnn", image_size=28, batch_norm=True)


@pytest.mark.parametrize(("fields", "message"), [
    ({"arch": "conv1d", "image_size": 32}, "conv1d takes \\[channels, length\\] sequences: image_size does not apply"),
    ({"arch": "transformer", "image_size": 8}, "transformer takes \\[length, channels\\]"),
    ({"arch": "preresnet", "length": 16}, "preresnet takes \\[channels, image_size, image_size\\] images: length"),
    ({"arch": "mobilenet", "batch_norm": False}, "mobilenet always has batch norm"),
    ({"arch": "transformer", "batch_norm": True}, "transformer never has batch norm \\(it normalizes with"),
    ({"arch": "conv1d", "length": 7}, "3 2x max pools do not fit a length of 7"),
    ({"arch": "transformer", "hidden": (32, 64, 64)}, "token width then the MLP's hidden width"),
    ({"arch": "mobilenet", "hidden": (16,)}, "stem width then one width per block"),
    ({"arch": "preresnet", "hidden": (16, 1)}, "must be >= 2"),
    ({"arch": "preresnet", "image_size": 64}, "image_size"),
    ({"arch": "conv1d", "channels": 0}, "channels"),
])
def test_edge_spec_refuses_what_the_arch_does_not_take(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**fields)


@pytest.mark.parametrize("spec", EDGE + EDGE_VARIANTS, ids=lambda s: s.name)
def test_edge_forward_graph_is_a_plain_onnx_classifier(spec: ModelSpec) -> None:
    params = init_global_params(spec)
    model = build_forward(spec, params)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert {node.op_type for node in model.graph.node} <= SUPPORTED_OPS
    assert [t.name for t in model.graph.initializer][: len(params)] == list(params)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*\.(weight|bias|running_mean|running_var)", n)
               for n in params), list(params)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":  # inference form, statistics named after the layer
            assert [a.name for a in node.attribute if a.name == "training_mode"] == [] and len(node.output) == 1
            layer = node.input[1].removesuffix(".weight")
            assert list(node.input[3:]) == [f"{layer}.running_mean", f"{layer}.running_var"]
    assert spec.batch_norm == any(n.op_type == "BatchNormalization" for n in model.graph.node)
    x = np.random.default_rng(0).random((3, *spec.input_shape), dtype=np.float32)
    session = ort.InferenceSession(model.SerializeToString())
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (3, spec.num_classes) and np.isfinite(logits).all()
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], logits)  # deterministic
    fed = zoo_tier(spec, 1.0, params_as_inputs=True, class_mask=True)
    mask = np.zeros(spec.num_classes, np.float32)
    mask[0] = -1e4
    (masked,) = ort.InferenceSession(fed.SerializeToString()).run(None, {"input": x, "class_mask": mask, **params})
    np.testing.assert_allclose(masked, logits + mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", EDGE + EDGE_VARIANTS, ids=lambda s: s.name)
def test_edge_init_is_deterministic_pytorch_like(spec: ModelSpec) -> None:
    a, b = init_global_params(spec), init_global_params(spec)
    other = init_global_params(spec.model_copy(update={"seed": 1}))
    assert {n: v.shape for n, v in a.items()} == zoo_shapes(spec) and all(v.dtype == np.float32 for v in a.values())
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name])
        layer, kind = name.rsplit(".", 1) if "." in name else (name, "")
        if kind in ("running_var",) or (kind == "weight" and layer.split(".")[-1].startswith(("bn", "norm"))):
            assert (value == 1).all(), name
        elif kind == "running_mean" or (kind == "bias" and layer.split(".")[-1].startswith(("bn", "norm"))):
            assert (value == 0).all(), name
        elif kind == "weight":  # U(+-1/sqrt(fan_in)), fan_in = inputs x kernel
            assert np.abs(value).max() <= 1 / math.sqrt(math.prod(value.shape[1:])), name
            assert np.abs(value).max() > 0.5 / math.sqrt(math.prod(value.shape[1:])), name
            assert not np.array_equal(value, other[name]), name


@pytest.mark.parametrize("spec", EDGE + EDGE_VARIANTS, ids=lambda s: s.name)
def test_edge_width_analysis_cuts_every_hidden_width(spec: ModelSpec) -> None:
    forward, plan = zoo_forward(spec)
    assert plan.blockers() == [] and plan.cuttable
    params = init_global_params(spec)
    assert list(plan.frozen) == [n for n in params if n.endswith(("running_mean", "running_var"))]
    assert sorted([*plan.trainable, *plan.frozen]) == sorted(params)
    cut = {name: size for name, (size, pinned) in plan.groups.items() if pinned is None}
    pinned = {name: pinned for name, (_, pinned) in plan.groups.items() if pinned is not None}
    assert pinned == {"fc.weight[0]": "fixed: the classes"}
    if spec.name in EXPECTED_GROUPS:
        assert cut == EXPECTED_GROUPS[spec.name]
    for name, value in params.items():  # the input's channels and the classes stay whole
        assert plan.param_shape(name, 1.0) == value.shape
    assert plan.param_shapes(0.0625)["fc.weight"][0] == spec.num_classes


@pytest.mark.parametrize("tier", list(TIER_RATES))
@pytest.mark.parametrize("spec", EDGE + EDGE_VARIANTS, ids=lambda s: s.name)
def test_edge_tier_computes_the_narrowed_model(spec: ModelSpec, tier: str) -> None:
    """A tier cut from the full graph computes the model at its width from the leading blocks of the global weights."""
    forward, plan = zoo_forward(spec)
    rate = tier_rate(tier)
    weights = _randomized(init_global_params(spec))
    model = cut_forward(forward, plan, rate, weights)
    tier_params = initializer_arrays(model, [*plan.trainable, *plan.frozen])
    expected_params = slice_params(weights, plan.param_shapes(rate))
    for name, value in expected_params.items():
        np.testing.assert_array_equal(tier_params[name], value)
    if rate < 1:
        assert sum(v.size for v in expected_params.values()) < sum(v.size for v in weights.values()) / 2
    x = np.random.default_rng(1).standard_normal((5, *spec.input_shape)).astype(np.float32)
    (logits,) = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})
    expected = _reference(spec, expected_params, x.astype(np.float64))
    assert logits.shape == (5, spec.num_classes)
    # float32 against float64: LayerNorm over the 2 channels of tier e amplifies rounding the most (5e-5)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))
    # and what depends on the sample (the logits minus their batch mean), to its own scale
    spread = expected - expected.mean(axis=0)
    np.testing.assert_allclose(logits - logits.mean(axis=0), spread, atol=1e-3 * np.abs(spread).max() + 1e-7)
    if rate >= 0.25:
        assert np.abs(spread).max() > 1e-3  # the comparison sees the input


def test_edge_macs() -> None:
    spec = ModelSpec(arch="preresnet")
    # stem, stage 1 (two 16->16 convs at 32x32), stages 2 and 3 (stride 2: conv1, conv2, 1x1 shortcut), fc
    by_hand = (3 * 16 * 9 * 32 * 32 + 2 * 16 * 16 * 9 * 32 * 32 + (16 * 32 * 9 + 32 * 32 * 9 + 16 * 32) * 16 * 16
               + (32 * 64 * 9 + 64 * 64 * 9 + 32 * 64) * 8 * 8 + 64 * 10)
    assert forward_macs(zoo_tier(spec, 1.0)) == by_hand == 12_501_632
    for spec in EDGE:
        forward, plan = zoo_forward(spec)
        macs = [forward_macs(cut_forward(forward, plan, rate)) for rate in TIER_RATES.values()]
        full = forward_macs(build_forward(spec, init_global_params(spec)))
        assert macs[0] == full and macs == sorted(macs, reverse=True) and macs[0] > 20 * macs[-1]


@pytest.mark.parametrize("spec", [s for s in EDGE if s.batch_norm], ids=lambda s: s.name)
def test_edge_statistics_graph_measures_every_batch_norm(spec: ModelSpec) -> None:
    params = init_global_params(spec)
    model = zoo_statistics(spec, 1.0)
    x = np.random.default_rng(0).random((6, *spec.input_shape), dtype=np.float32)
    outputs = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x, **params})
    layers = [n.removesuffix(".running_mean") for n in zoo_plan(spec).frozen if n.endswith("running_mean")]
    assert [o.name for o in model.graph.output] == [f"{n}.batch_{s}" for n in layers for s in ("mean", "var")]
    assert all(np.isfinite(o).all() for o in outputs)
    first = _conv(x.astype(np.float64), params[[n for n in params if n.endswith(".weight")][0]].astype(np.float64),
                  stride=2 if spec.arch == "mobilenet" else 1)
    np.testing.assert_allclose(outputs[0], first.mean(axis=tuple(i for i in range(first.ndim) if i != 1)), atol=1e-5)


@pytest.fixture(scope="module", params=EDGE, ids=lambda s: s.name)
def edge_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Path]:
    """Tiers a and e of each edge model, exported as the zoo exports (the generic path)."""
    spec = request.param
    out = tmp_path_factory.mktemp(spec.name)
    export_all(spec, ["a", "e"], out)
    return spec, out


def test_edge_export_layout(edge_export: tuple[ModelSpec, Path]) -> None:
    spec, out = edge_export
    index = ExportIndex.load(out / INDEX_NAME)
    assert index.model == zoo_card(spec) and index.model.recipe == spec and list(index.tiers) == ["a", "e"]
    assert index.model.input_shape == list(spec.input_shape) and index.model.batch_norm == spec.batch_norm
    cut = {name: group.size for name, group in index.groups.items() if group.pinned is None}
    assert cut == EXPECTED_GROUPS[spec.name]
    forward, plan = zoo_forward(spec)
    x = np.random.default_rng(0).random((4, *spec.input_shape), dtype=np.float32)
    (full,) = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x})
    built_model = build_forward(spec, init_global_params(spec))
    (built,) = ort.InferenceSession(built_model.SerializeToString()).run(None, {"input": x})
    np.testing.assert_allclose(full, built, rtol=1e-5, atol=1e-6)
    for tier in index.tiers:
        manifest = TierManifest.load(out / tier / MANIFEST_NAME)
        assert manifest.input_shape == ["N", *spec.input_shape] and manifest.rate == tier_rate(tier)
        assert {p.name: tuple(p.shape) for p in manifest.params} == plan.param_shapes(tier_rate(tier))
        assert (STATISTICS_FILE in manifest.files) == spec.batch_norm
        (logits,) = ort.InferenceSession(str(out / tier / "inference.onnx")).run(None, {"input": x})
        assert logits.shape == (4, spec.num_classes) and np.isfinite(logits).all()
    macs = {t: TierManifest.load(out / t / MANIFEST_NAME).macs for t in index.tiers}
    assert macs["a"] == forward_macs(built_model) and macs["a"] > 20 * macs["e"]


@pytest.mark.parametrize("tier", ["a", "e"])
def test_edge_export_trains_one_step_on_both_backends(edge_export: tuple[ModelSpec, Path], tier: str) -> None:
    """One SGD step of the onnxruntime-training artifacts moves the weights just as the portable step graph does."""
    spec, out = edge_export
    api = load_training_api().api
    with captured_native_stderr():
        state = api.CheckpointState.load_checkpoint(str(out / tier / "checkpoint"))
        module = api.Module(str(out / tier / "training_model.onnx"), state, str(out / tier / "eval_model.onnx"))
        optimizer = api.Optimizer(str(out / tier / "optimizer_model.onnx"), module)
    before = {name: np.array(p.data) for name, p in state.parameters}
    rng = np.random.default_rng(0)
    x, y = rng.random((8, *spec.input_shape), dtype=np.float32), np.arange(8, dtype=np.int64) % spec.num_classes
    feeds = {"input": x, "labels": y, "class_mask": np.zeros(spec.num_classes, np.float32)}
    optimizer.set_learning_rate(0.1)
    module.train()
    loss, _ = module(*(feeds[name] for name in module.input_names()))
    optimizer.step()
    after = {name: np.array(p.data) for name, p in state.parameters}
    plan = zoo_plan(spec)
    assert np.isfinite(loss) and set(after) == {*plan.trainable, *plan.frozen}
    moved = [name for name in plan.trainable if not np.array_equal(after[name], before[name])]
    # most weights move; some have no gradient here (attention's key bias never has one; at tier e a
    # 1-wide squeeze-excitation ReLU can be dead, or tokens normalized over 2 channels alike)
    assert "fc.weight" in moved and len(moved) > 0.75 * len(plan.trainable)

    step = onnx.load(out / tier / STEP_FILE)
    io = step_graph_io(step)
    given = {**feeds, "learning_rate": np.array([0.1], np.float32), "momentum": np.zeros(1, np.float32),
             **io.initial_optimizer_state(), **before}
    outputs = dict(zip(io.outputs, ort.InferenceSession(step.SerializeToString()).run(
        None, {name: given[name] for name in io.inputs})))
    np.testing.assert_allclose(outputs["loss"], loss, rtol=1e-5)
    for name in plan.trainable:
        np.testing.assert_allclose(outputs[io.updates[name]], after[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_cli_exports_an_edge_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tierfl export")
    configure_parser(parser)
    assert "preresnet" in parser.format_help() and "3x32x32" in parser.format_help()
    args = parser.parse_args(["--arch", "conv1d", "--channels", "6", "--length", "32", "--hidden", "8,16", "--tiers",
                              "a,e", "--out", str(tmp_path / "imu")])
    assert run(args) == 0
    assert "conv1d-6x32-h8x16" in capsys.readouterr().out
    card = ExportIndex.load(tmp_path / "imu" / INDEX_NAME).model
    assert (card.input_shape, card.batch_norm, card.recipe) == ([6, 32], True, ModelSpec(arch="conv1d", channels=6,
                                                                                        length=32, hidden=(8, 16)))
    args = parser.parse_args(["--arch", "conv1d", "--image-size", "32", "--out", str(tmp_path / "refused")])
    assert run(args) == 2 and not (tmp_path / "refused").exists()
    defaults = parser.parse_args(["--arch", "preresnet", "--out", str(tmp_path)])
    assert (defaults.image_size, defaults.channels, defaults.batch_norm) == (None, None, False)  # the arch's own
