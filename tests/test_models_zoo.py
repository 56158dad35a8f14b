"""Model zoo, tier catalog and HeteroFL slicing: shapes, names, init, graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from models.slicing import slice_params
from models.tiers import TIER_RATES, scaled_width, tier_rate
from models.zoo import (ModelSpec, build_forward, forward_macs, frozen_names, init_global_params, param_shapes,
                        trainable_names)
from protocol.blocks import leading_slices

SPECS = [
    ModelSpec(arch="mlp"),
    ModelSpec(arch="mlp", image_size=28),
    ModelSpec(arch="cnn"),
    ModelSpec(arch="cnn", image_size=28),
    ModelSpec(arch="cnn", batch_norm=True),
    ModelSpec(arch="mlp", batch_norm=True),
]


def _expected_shapes(spec: ModelSpec, rate: float) -> dict[str, tuple[int, ...]]:
    """The HeteroFL shapes written out by hand, independent of the zoo's layer plan."""
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
    shapes = param_shapes(spec, tier_rate(tier))
    assert shapes == _expected_shapes(spec, tier_rate(tier))
    assert list(shapes) == list(param_shapes(spec))  # same names, same order on every tier


def test_concrete_shapes() -> None:
    assert param_shapes(ModelSpec(arch="cnn", image_size=28), 0.125) == {
        "conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,),
        "conv2.weight": (8, 4, 3, 3), "conv2.bias": (8,),
        "fc1.weight": (16, 8 * 7 * 7), "fc1.bias": (16,),
        "fc2.weight": (10, 16), "fc2.bias": (10,),
    }  # fmt: skip
    assert param_shapes(ModelSpec(arch="mlp"), 0.0625)["fc1.weight"] == (16, 64)


def test_trainable_and_frozen_names() -> None:
    bn = ModelSpec(arch="cnn", batch_norm=True)
    assert frozen_names(bn) == ["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"]
    assert trainable_names(bn) + frozen_names(bn) != list(param_shapes(bn))  # interleaved in ONNX order
    assert sorted(trainable_names(bn) + frozen_names(bn)) == sorted(param_shapes(bn))
    assert frozen_names(ModelSpec(arch="mlp")) == []


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
    assert list(a) == list(param_shapes(spec))
    for name, arr in a.items():
        assert arr.dtype == np.float32 and arr.shape == param_shapes(spec)[name]
        np.testing.assert_array_equal(arr, b[name])
    w = a["fc1.weight"]
    assert np.abs(w).max() <= 1 / math.sqrt(w.shape[1]) and not np.array_equal(w, other["fc1.weight"])
    if spec.batch_norm:
        assert (a["bn1.weight"] == 1).all() and (a["bn1.bias"] == 0).all()
        assert (a["bn1.running_mean"] == 0).all() and (a["bn1.running_var"] == 1).all()


def test_slicing_round_trip() -> None:
    spec = ModelSpec(arch="cnn", batch_norm=True)
    glob = init_global_params(spec)
    shapes = param_shapes(spec, 0.25)
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
    params = slice_params(init_global_params(spec), param_shapes(spec, rate))
    model = build_forward(spec, rate, params)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and model.opset_import[0].version == 17
    assert [t.name for t in model.graph.initializer] == list(param_shapes(spec, rate))
    x = np.random.default_rng(0).random((3, 1, spec.image_size, spec.image_size), dtype=np.float32)
    (logits,) = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})
    assert logits.shape == (3, spec.num_classes) and logits.dtype == np.float32

    as_inputs = build_forward(spec, rate, params, params_as_inputs=True)
    onnx.checker.check_model(as_inputs, full_check=True)
    assert len(as_inputs.graph.initializer) == 0
    assert [i.name for i in as_inputs.graph.input] == ["input", *param_shapes(spec, rate)]
    (fed,) = ort.InferenceSession(as_inputs.SerializeToString()).run(None, {"input": x, **params})
    np.testing.assert_allclose(fed, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec,hidden_layers", [(SPECS[0], 2), (SPECS[2], 3), (SPECS[4], 3), (SPECS[5], 2)], ids=lambda s: str(s))
def test_scaler_input_multiplies_every_hidden_layer(spec: ModelSpec, hidden_layers: int) -> None:
    rate = 0.25
    params = slice_params(init_global_params(spec), param_shapes(spec, rate))
    plain, scaled = build_forward(spec, rate, params), build_forward(spec, rate, params, scaler=True)
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
    spec = ModelSpec(arch="mlp")
    assert forward_macs(spec) == 64 * 256 + 256 * 256 + 256 * 10
    macs = [forward_macs(ModelSpec(arch="cnn", image_size=28), r) for r in TIER_RATES.values()]
    assert macs == sorted(macs, reverse=True) and macs[0] > 100 * macs[-1]


def test_forward_rejects_wrong_params() -> None:
    spec = ModelSpec(arch="mlp")
    params = init_global_params(spec)
    with pytest.raises(ValueError, match="expected shape"):
        build_forward(spec, 0.5, params)
    del params["fc3.bias"]
    with pytest.raises(ValueError, match="missing"):
        build_forward(spec, 1.0, params)
