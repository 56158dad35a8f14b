"""Portable training steps: one ONNX graph (default domain only) that runs a whole SGD/AdamW step.

`build_step_graph` takes any forward graph of a classifier (`input` with a symbolic batch first,
its parameters as graph inputs, `logits` [N, classes]), differentiates it (models.autodiff: the
maintained onnx-ad package for most operators, our own rules for training-mode BatchNorm, the
grouped-Conv weight gradient onnx-ad refuses and, as a faster form, the zoo's operators) and
appends the loss and the optimizer update, so plain onnxruntime (any build, any platform with a
wheel) can train: feed the batch, the hyperparameters, the weights and the optimizer state; read
back the loss, the logits and the new weights and state (`<name>.new`). `step_graph_io` reads the
names off a step graph. Other inputs of the forward (`class_mask`, `scale`) pass through. Dropout
is the identity here (the importer removes it from exported graphs anyway). One graph takes any
batch size (see models.autodiff on how onnx-ad's baked shapes are made batch-dependent).

The step matches onnxruntime-training's artifacts (models.export): mean cross-entropy loss,
BatchNorm with batch statistics whose running statistics are updated with momentum 0.9 and the
biased batch variance, SGD `w -= lr * g` (momentum 0; `buf = momentum * buf + g; w -= lr * buf`
otherwise, as PyTorch) and onnxblock's AdamW (HuggingFace form: bias correction folded into the
learning rate, decoupled weight decay applied after the update; betas 0.9/0.999, eps 1e-6, no
weight decay by default). FedProx adds mu/2 * sum ||w - w_global||^2 to the loss.

Speed (median ms per step, batch 32, SGD without momentum as exported, class mask, 1 intra-op
thread, onnxruntime 1.19.2, the graphs interleaved; two runs on a shared 2-core machine):

| model (rate 1) | hand rules only (before) | hybrid (built here) | onnx-ad for all but BN |
|---|---|---|---|
| MLP 8x8 | 0.38-0.39 | 0.38 | 0.44-0.45 (1.15x) |
| CNN 8x8 | 2.61-2.64 | 2.58-2.61 | 3.51-3.55 (1.35x) |
| CNN 28x28 | 21.7-23.6 | 21.8-23.2 | 33.8-35.7 (1.5x) |

onnx-ad carries a seed axis through every gradient (Transposes around each MatMul and Conv),
scatters MaxPool gradients with ScatterND and lacks im2col, hence the hybrid: where a zoo
operator's hand rule applies it is used (the zoo's graphs are then node for node the ones the
hand rules alone built), onnx-ad everywhere else. Dropping onnx-ad's size-1 seed-axis moves
(models.autodiff) gains 3-5% on its graphs.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import autodiff
from models.autodiff import NEW_SUFFIX, GraphBuilder
from models.spec import GLOBAL_SUFFIX, INPUT_NAME, IR_VERSION, MU_NAME, OPSET, OUTPUT_NAME
from models.tier_graph import live

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


def _batch_dim(forward: onnx.ModelProto) -> str:
    """The symbolic batch dimension: the first dimension of the forward's data input."""
    inputs = {v.name: v for v in forward.graph.input}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in {v.name for v in forward.graph.output}:
        raise ValueError(f"the forward graph needs an input {INPUT_NAME!r} and an output {OUTPUT_NAME!r}")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise ValueError(f"the forward's {INPUT_NAME!r} needs a symbolic batch dimension first (such as 'N')")
    return dims[0].dim_param


def _prepared(forward: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `forward` with its Constant nodes as initializers and its Dropout nodes as Identity.

    Training treats Dropout as the identity (the importer removes it from exported graphs anyway).
    """
    opset = {o.domain: o.version for o in forward.opset_import}.get("", 0)
    if opset != OPSET:
        raise ValueError(f"the forward graph has opset {opset}; the step graph is built for opset {OPSET}")
    model = onnx.ModelProto()
    model.CopyFrom(forward)
    nodes = []
    for node in model.graph.node:
        outputs = [o for o in node.output if o]
        if node.op_type == "Constant":
            model.graph.initializer.append(numpy_helper.from_array(autodiff.constant_value(node), node.output[0]))
        elif node.op_type == "Dropout" and len(outputs) == 1:
            nodes.append(helper.make_node("Identity", [node.input[0]], outputs, name=node.name))
        elif node.op_type in ("Dropout", "BatchNormalization") and len(outputs) > 1:
            raise ValueError(f"{node.op_type} {node.name}: only its first output may be used (export in eval mode)")
        else:
            nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def _params(forward: onnx.ModelProto, trainable: Sequence[str], frozen: Sequence[str]) -> tuple[list[str], list[str]]:
    """Trainable and frozen parameters in the forward's input order, checked against the graph."""
    inputs = [v.name for v in forward.graph.input]
    wrong = sorted({*trainable, *frozen} - set(inputs) | set(trainable) & set(frozen) | {INPUT_NAME} & {*trainable, *frozen})
    if wrong:
        raise ValueError(f"parameters must be distinct graph inputs of the forward other than {INPUT_NAME!r}: {wrong}")
    running = {n for node in forward.graph.node if node.op_type == "BatchNormalization" for n in node.input[3:5]}
    if set(frozen) != running:
        raise ValueError(f"frozen must name exactly the BatchNormalization running statistics: {sorted(running)}")
    return [n for n in inputs if n in set(trainable)], [n for n in inputs if n in running]


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """A copy of `value` (type and shape) under another name."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def _io(
    forward: onnx.ModelProto, trainable: list[str], frozen: list[str], optimizer: Optimizer, proximal: bool,
    momentum: bool, with_gradients: bool,
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs (data, labels, hyperparameters, parameters, state, globals) and outputs, typed from the forward."""
    declared = {v.name: v for v in (*forward.graph.input, *forward.graph.output)}
    suffixes = STATE_SUFFIXES[optimizer] if optimizer != "sgd" or momentum else ()
    state = [_renamed(declared[p], p + s) for s in suffixes for p in trainable]
    state += [helper.make_tensor_value_info(STEP_NAME, TensorProto.FLOAT, [1])] if optimizer == "adamw" else []
    with_momentum = optimizer == "sgd" and momentum
    hyper = [LEARNING_RATE_NAME, *([MOMENTUM_NAME] if with_momentum else []), *([MU_NAME] if proximal else [])]
    params = {*trainable, *frozen}
    batch = declared[INPUT_NAME].type.tensor_type.shape.dim[0].dim_param
    inputs = [declared[v.name] for v in forward.graph.input if v.name not in params]
    inputs += [helper.make_tensor_value_info(LABELS_NAME, TensorProto.INT64, [batch])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in hyper]
    inputs += [declared[v.name] for v in forward.graph.input if v.name in params]
    inputs += [*state, *(_renamed(declared[p], p + GLOBAL_SUFFIX) for p in (trainable if proximal else []))]
    updated = [_renamed(declared[p], p + NEW_SUFFIX) for p in (*trainable, *frozen)]
    updated += [_renamed(value, value.name + NEW_SUFFIX) for value in state]
    outputs = [helper.make_tensor_value_info(LOSS_NAME, TensorProto.FLOAT, []), declared[OUTPUT_NAME], *updated]
    outputs += [_renamed(declared[p], p + GRAD_SUFFIX) for p in trainable] if with_gradients else []
    return inputs, outputs


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


def _builder(
    forward: onnx.ModelProto, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto]
) -> GraphBuilder:
    """A builder for the step graph of `forward` (whose names the step's own inputs and outputs must not reuse)."""
    constants = {t.name: numpy_helper.to_array(t) for t in forward.graph.initializer}
    forward_names = {*constants, *(v.name for v in forward.graph.input), *(t for n in forward.graph.node for t in n.output)}
    declared = {v.name: v for v in (*forward.graph.input, *forward.graph.output)}
    own = {v.name for v in (*inputs, *outputs)} - set(declared)
    if own & forward_names:
        raise ValueError(f"the forward graph uses names the step graph needs: {sorted(own & forward_names)}")
    types = autodiff.tensor_types(forward, _batch_dim(forward))
    image = types.shape(INPUT_NAME)
    return GraphBuilder(
        taken={*own, *forward_names, *(t for n in forward.graph.node for t in n.input)},
        types=types,
        constants=constants,
        batch_source=INPUT_NAME,
        im2col=len(image) == 4 and min(image[2:]) >= IM2COL_MIN_IMAGE,
    )


def build_step_graph(
    forward: onnx.ModelProto,
    trainable: Sequence[str],
    frozen: Sequence[str] = (),
    optimizer: Optimizer = "sgd",
    proximal: bool = False,
    with_gradients: bool = False,
    weight_decay: float = ADAMW_WEIGHT_DECAY,
    momentum: bool = True,
) -> onnx.ModelProto:
    """One training step of the classifier `forward` as a default-domain ONNX graph; `step_graph_io` names its IO.

    `forward` takes `input` (symbolic batch first) and its parameters as graph inputs and writes
    `logits` [N, classes]; `trainable` get gradients, `frozen` are exactly its BatchNorm running
    statistics (updated with momentum); any other input (`class_mask`, `scale`) passes through.
    `weight_decay` is AdamW's decoupled weight decay (SGD has none). With `with_gradients`, the
    gradients of the loss (FedProx term included) are outputs too, `<param>.grad`. SGD with
    `momentum=False` is plain SGD without a buffer (what the exported artifacts use, like
    onnxruntime-training's SGD): two passes less over every parameter per step.
    """
    if optimizer not in STATE_SUFFIXES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(STATE_SUFFIXES)}")
    if weight_decay and optimizer != "adamw":
        raise ValueError("weight_decay applies to AdamW only")
    autodiff.require_onnx_ad()
    forward = autodiff.explicit_padding(_prepared(forward), _batch_dim(forward))
    trainable, frozen = _params(forward, trainable, frozen)
    inputs, outputs = _io(forward, trainable, frozen, optimizer, proximal, momentum, with_gradients)
    g = _builder(forward, inputs, outputs)
    for node in forward.graph.node:
        autodiff.lower_for_training(g, node)
    loss = LOSS_NAME if not proximal else g.fresh("cross_entropy")
    dlogits = autodiff.softmax_cross_entropy(g, OUTPUT_NAME, LABELS_NAME, loss)
    grads = autodiff.backward(g, forward.graph.node, {OUTPUT_NAME: dlogits}, trainable)
    if set(grads) != set(trainable):
        raise ValueError(f"trainable parameters that do not reach the logits: {sorted(set(trainable) - set(grads))}")
    if proximal:
        grads = _proximal(g, loss, grads)
    for p in trainable if with_gradients else []:
        g.op("Identity", [grads[p]], outputs=[p + GRAD_SUFFIX])
    (_OPTIMIZERS[optimizer] if optimizer != "sgd" or momentum else _plain_sgd)(g, grads, weight_decay)
    name = f"{forward.graph.name or 'model'}_{optimizer}_step"
    nodes, constants = live(g.nodes, [*forward.graph.initializer, *g.initializers], [v.name for v in outputs])
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=constants)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tierfl", ir_version=IR_VERSION
    )
    log.debug("step graph %s: %d nodes, %d inputs", graph.name, len(graph.node), len(graph.input))
    return model
