"""Portable training steps: one ONNX graph (default domain only) that runs a whole SGD/AdamW step.

`build_step_graph` differentiates a zoo model with the rules of `models.autodiff` and appends the
optimizer update, so plain onnxruntime (any build, any platform with a wheel) can train: feed the
batch, the hyperparameters, the weights and the optimizer state; read back the loss, the logits
and the new weights and state (`<name>.new`). `step_graph_io` reads the names off a step graph.

The step matches onnxruntime-training's artifacts (models.export): mean cross-entropy loss,
BatchNorm with batch statistics whose running statistics are updated with momentum 0.9 and the
biased batch variance, SGD `w -= lr * g` (momentum 0; `buf = momentum * buf + g; w -= lr * buf`
otherwise, as PyTorch) and onnxblock's AdamW (HuggingFace form: bias correction folded into the
learning rate, decoupled weight decay applied after the update; betas 0.9/0.999, eps 1e-6, no
weight decay by default). FedProx adds mu/2 * sum ||w - w_global||^2 to the loss.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from models import autodiff
from models.autodiff import NEW_SUFFIX, GraphBuilder
from models.spec import GLOBAL_SUFFIX, MU_NAME
from models.zoo import (CLASS_MASK_NAME, INPUT_NAME, IR_VERSION, OPSET, OUTPUT_NAME, SCALE_NAME, ModelSpec,
                        build_forward, frozen_names, param_shapes, trainable_names)

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adamw"]
LABELS_NAME = "labels"
LEARNING_RATE_NAME = "learning_rate"
LOSS_NAME = "loss"
MOMENTUM_NAME = "momentum"  # SGD momentum coefficient [1]; 0 is plain SGD
STEP_NAME = "step"  # AdamW: steps taken so far [1] (0 before the first step)
GRAD_SUFFIX = ".grad"
STATE_SUFFIXES: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {"sgd": (".momentum",), "adamw": (".exp_avg", ".exp_avg_sq")}  # per trainable parameter
)
IM2COL_MIN_IMAGE = 16  # Conv weight gradients as im2col from this input size on (models.autodiff._conv)
ADAMW_BETAS = (0.9, 0.999)  # onnxblock AdamW defaults (the artifacts models.export writes)
ADAMW_EPSILON = 1e-6
ADAMW_WEIGHT_DECAY = 0.0


@dataclasses.dataclass(frozen=True)
class StepGraphIO:
    """Input and output names of a step graph, and which output carries each input's new value.

    `updates` maps every carried input (trainable parameters, BN running statistics, optimizer
    state) to its output `<name>.new`; `gradients` maps each trainable parameter to `<name>.grad`
    (only with `with_gradients`). `state_shapes` gives the shape of each optimizer state input.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    trainable: tuple[str, ...]
    running_stats: tuple[str, ...]
    updates: Mapping[str, str]
    gradients: Mapping[str, str]
    state_shapes: Mapping[str, tuple[int, ...]]

    def initial_optimizer_state(self) -> dict[str, np.ndarray]:
        """Zeros for every optimizer state input (buffers and the AdamW step count)."""
        return {name: np.zeros(shape, np.float32) for name, shape in self.state_shapes.items()}


def step_graph_io(model: onnx.ModelProto) -> StepGraphIO:
    """Read the names of a step graph (built by `build_step_graph`, or loaded from a file)."""
    inputs = tuple(i.name for i in model.graph.input)
    outputs = tuple(o.name for o in model.graph.output)
    carried = [n for n in inputs if n + NEW_SUFFIX in outputs]
    suffixes = [s for group in STATE_SUFFIXES.values() for s in group]
    trainable = tuple(n for n in carried if any(n + s in carried for s in suffixes))
    state = [n for n in carried if n == STEP_NAME or any(n == p + s for p in trainable for s in suffixes)]
    dims = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    return StepGraphIO(
        inputs=inputs,
        outputs=outputs,
        trainable=trainable,
        running_stats=tuple(n for n in carried if n not in trainable and n not in state),
        updates={n: n + NEW_SUFFIX for n in carried},
        gradients={n: n + GRAD_SUFFIX for n in inputs if n + GRAD_SUFFIX in outputs},
        state_shapes={n: dims[n] for n in state},
    )


def _io_names(
    spec: ModelSpec, rate: float, optimizer: Optimizer, data: list[str], proximal: bool, momentum: bool = True
) -> tuple[list[str], list[str]]:
    """Graph inputs and outputs (without gradients): data, hyperparameters, parameters, state, globals."""
    if optimizer not in STATE_SUFFIXES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(STATE_SUFFIXES)}")
    trainable = trainable_names(spec)
    suffixes = STATE_SUFFIXES[optimizer] if optimizer != "sgd" or momentum else ()
    state = [p + s for s in suffixes for p in trainable] + ([STEP_NAME] if optimizer == "adamw" else [])
    with_momentum = optimizer == "sgd" and momentum
    hyper = [LEARNING_RATE_NAME, *([MOMENTUM_NAME] if with_momentum else []), *([MU_NAME] if proximal else [])]
    globals_ = [p + GLOBAL_SUFFIX for p in trainable] if proximal else []
    inputs = [*data, LABELS_NAME, *hyper, *param_shapes(spec, rate), *state, *globals_]
    updated = [*trainable, *frozen_names(spec), *state]
    return inputs, [LOSS_NAME, OUTPUT_NAME, *(n + NEW_SUFFIX for n in updated)]


def _proximal(g: GraphBuilder, loss: str, grads: dict[str, str]) -> dict[str, str]:
    """FedProx: write loss + mu/2 sum ||w - w_global||^2 to LOSS_NAME; return grads + mu (w - w_global)."""
    mu = g.op("Squeeze", [MU_NAME], "mu_scalar")
    out, squares = {}, []
    for p, grad in grads.items():
        drift = g.op("Sub", [p, p + GLOBAL_SUFFIX], f"{p}.drift")
        out[p] = g.op("Add", [grad, g.op("Mul", [drift, mu])], f"{p}.prox_grad")
        squares.append(g.op("ReduceSumSquare", [drift], keepdims=0))
    penalty = g.op("Mul", [g.op("Sum", squares), g.op("Mul", [mu, g.const(0.5)])], "proximal_term")
    g.op("Add", [loss, penalty], outputs=[LOSS_NAME])
    return out


def _sgd(g: GraphBuilder, grads: Mapping[str, str], weight_decay: float) -> None:
    """buf = momentum * buf + g; w -= lr * buf (momentum 0: plain SGD, as onnxruntime-training's SGD)."""
    for p, grad in grads.items():
        buffer = f"{p}.momentum"
        kept = g.op("Mul", [buffer, MOMENTUM_NAME])
        new_buffer = g.op("Add", [kept, grad], outputs=[buffer + NEW_SUFFIX])
        g.op("Sub", [p, g.op("Mul", [new_buffer, LEARNING_RATE_NAME])], outputs=[p + NEW_SUFFIX])


def _plain_sgd(g: GraphBuilder, grads: Mapping[str, str], weight_decay: float) -> None:
    """w -= lr * g: onnxruntime-training's SGD, with no momentum buffer to carry."""
    for p, grad in grads.items():
        g.op("Sub", [p, g.op("Mul", [grad, LEARNING_RATE_NAME])], outputs=[p + NEW_SUFFIX])


def _moment(g: GraphBuilder, old: str, value: str, beta: float) -> str:
    """Exponential moving average beta * old + (1 - beta) * value, written to `old.new`."""
    kept = g.op("Mul", [old, g.const(beta)])
    fresh = g.op("Mul", [value, g.const(np.float32(1) - np.float32(beta))])
    return g.op("Add", [kept, fresh], outputs=[old + NEW_SUFFIX])


def _adamw(g: GraphBuilder, grads: Mapping[str, str], weight_decay: float) -> None:
    """onnxblock AdamW (adam_mode 1): w -= lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps); then w -= lr wd w."""
    beta1, beta2 = ADAMW_BETAS
    t = g.op("Add", [STEP_NAME, g.const(1.0)], outputs=[STEP_NAME + NEW_SUFFIX])
    one = g.const(1.0)
    corrections = [g.op("Sub", [one, g.op("Pow", [g.const(beta), t])]) for beta in (beta1, beta2)]
    lr_corrected = g.op("Mul", [LEARNING_RATE_NAME, g.op("Div", [g.op("Sqrt", [corrections[1]]), corrections[0]])])
    decay = g.op("Mul", [LEARNING_RATE_NAME, g.const(weight_decay)], "lr_weight_decay") if weight_decay else ""
    for p, grad in grads.items():
        m = _moment(g, f"{p}.exp_avg", grad, beta1)
        v = _moment(g, f"{p}.exp_avg_sq", g.op("Mul", [grad, grad]), beta2)
        direction = g.op("Div", [m, g.op("Add", [g.op("Sqrt", [v]), g.const(ADAMW_EPSILON)])])
        stepped = g.op("Sub", [p, g.op("Mul", [direction, lr_corrected])], outputs=[] if decay else [p + NEW_SUFFIX])
        if decay:
            g.op("Sub", [stepped, g.op("Mul", [stepped, decay])], outputs=[p + NEW_SUFFIX])


_OPTIMIZERS: Mapping[str, Callable[[GraphBuilder, Mapping[str, str], float], None]] = types.MappingProxyType(
    {"sgd": _sgd, "adamw": _adamw}
)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor of `model` that shape inference can tell."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.input, *graph.value_info, *graph.output)}


def _value_info(name: str, spec: ModelSpec, params: Mapping[str, tuple[int, ...]]) -> onnx.ValueInfoProto:
    """Declared type and shape of a graph input or output; `<x>.<suffix>` has the shape of `x`."""
    size, classes = spec.image_size, spec.num_classes
    fixed: dict[str, list[int | str]] = {INPUT_NAME: ["N", 1, size, size], LABELS_NAME: ["N"], LOSS_NAME: []}
    fixed |= {CLASS_MASK_NAME: [classes], OUTPUT_NAME: ["N", classes]}
    base = name
    while base not in fixed and base not in params and "." in base:
        base = base.rpartition(".")[0]
    shape = fixed[base] if base in fixed else list(params.get(base, [1]))
    return helper.make_tensor_value_info(name, TensorProto.INT64 if name == LABELS_NAME else TensorProto.FLOAT, shape)


def build_step_graph(
    spec: ModelSpec,
    rate: float,
    optimizer: Optimizer = "sgd",
    scaler: bool = False,
    class_mask: bool = False,
    proximal: bool = False,
    with_gradients: bool = False,
    weight_decay: float = ADAMW_WEIGHT_DECAY,
    momentum: bool = True,
) -> onnx.ModelProto:
    """One training step of `spec` at `rate` as a default-domain ONNX graph; `step_graph_io` names its IO.

    `weight_decay` is AdamW's decoupled weight decay (SGD has none). With `with_gradients`, the
    gradients of the loss (FedProx term included) are outputs too, `<param>.grad`. SGD with
    `momentum=False` is plain SGD without a buffer (what the exported artifacts use, like
    onnxruntime-training's SGD): two passes less over every parameter per step.
    """
    if weight_decay and optimizer != "adamw":
        raise ValueError("weight_decay applies to AdamW only")
    data = [INPUT_NAME, *([SCALE_NAME] if scaler else []), *([CLASS_MASK_NAME] if class_mask else [])]
    inputs, outputs = _io_names(spec, rate, optimizer, data, proximal, momentum)
    trainable, shapes = trainable_names(spec), param_shapes(spec, rate)
    outputs += [p + GRAD_SUFFIX for p in trainable] if with_gradients else []
    zeros = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    forward = build_forward(spec, rate, zeros, params_as_inputs=True, scaler=scaler, class_mask=class_mask)
    taken = {*inputs, *outputs, *(t for n in forward.graph.node for t in (*n.input, *n.output))}
    g = GraphBuilder(taken=taken, ranks=_ranks(forward), im2col=spec.image_size >= IM2COL_MIN_IMAGE)
    for node in forward.graph.node:
        autodiff.lower_for_training(g, node)
    loss = LOSS_NAME if not proximal else g.fresh("cross_entropy")
    dlogits = autodiff.softmax_cross_entropy(g, OUTPUT_NAME, LABELS_NAME, loss)
    grads = autodiff.backward(g, forward.graph.node, {OUTPUT_NAME: dlogits}, trainable)
    if proximal:
        grads = _proximal(g, loss, grads)
    for p in trainable if with_gradients else []:
        g.op("Identity", [grads[p]], outputs=[p + GRAD_SUFFIX])
    (_OPTIMIZERS[optimizer] if optimizer != "sgd" or momentum else _plain_sgd)(g, grads, weight_decay)
    graph = helper.make_graph(
        g.nodes,
        f"{spec.name}_r{rate:g}_{optimizer}_step",
        [_value_info(n, spec, shapes) for n in inputs],
        [_value_info(n, spec, shapes) for n in outputs],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tierfl", ir_version=IR_VERSION
    )
    log.debug("step graph %s: %d nodes, %d inputs", graph.name, len(graph.node), len(graph.input))
    return model
