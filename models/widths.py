"""Generic width analysis: which channels of a forward graph must be cut together (HeteroFL groups).

Every axis of every tensor gets a label: the batch, a fixed axis (kept whole: the model's input
features, spatial and time axes, the classes), or a *width group*. Each parameter axis starts in a
group of its own; walking the graph in order, each operator joins the groups it ties together:
a Conv's input channels with its weight's axis 1, its output channels with its weight's axis 0,
its bias and the BatchNorm after it; the tensors of a residual Add or a squeeze-excitation Mul;
a depthwise Conv's inputs and outputs; Flatten's channel-major blocks with the next Gemm's
columns. Joining a group with a fixed axis pins it: it stays whole. A tier keeps the leading
ceil(rate x size) channels of every group that is not pinned, so each tier parameter is the
leading block of the global one.

An axis label may carry an `inner` factor: Flatten of [N, C, H, W] gives one axis of C x H x W
elements whose leading kept(C) x H x W are what a tier keeps, as long as C is the outermost
merged axis and H, W are fixed. Anything that would make a tier's part of an axis other than its
leading block (a Concat of two groups, channels-last flattening, grouped convolutions) pins the
groups involved, naming the node.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import onnx
from onnx import TensorProto, helper, numpy_helper

from models.onnx_import import UnsupportedModel, infer_shapes
from models.spec import INPUT_NAME, OUTPUT_NAME, RUNNING_STATISTICS
from models.tiers import scaled_width

BATCH = -1  # the label of the batch axis
FIXED = 0  # the label of an axis kept whole that belongs to no group (spatial, time, input features)


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis's label: BATCH, FIXED, or a width group (`group` >= 1), `inner` elements per channel."""

    group: int
    inner: int = 1


_BATCH, _FIXED = Axis(BATCH), Axis(FIXED)


class _Groups:
    """Union-find over width groups, each with its channel count at rate 1 and, once pinned, why."""

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.size: list[int] = [0]
        self.pinned: dict[int, str] = {}

    def new(self, size: int) -> int:
        """A fresh group of `size` channels."""
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, group: int) -> int:
        """The group's representative."""
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def pin(self, group: int, why: str) -> None:
        """Keep the group whole (the first reason stays)."""
        if group != FIXED:
            self.pinned.setdefault(self.find(group), why)

    def is_pinned(self, group: int) -> bool:
        """True for FIXED and for a pinned group."""
        return group == FIXED or self.find(group) in self.pinned

    def join(self, a: int, b: int, why: str) -> int:
        """Merge two groups (a pin carries over); returns the representative."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise UnsupportedModel(f"{why}: channel groups of {self.size[ra]} and {self.size[rb]} meet")
        self.parent[rb] = ra
        if rb in self.pinned:
            self.pinned.setdefault(ra, self.pinned.pop(rb))
        return ra


@dataclasses.dataclass(frozen=True)
class WidthPlan:
    """What the analysis found: the groups, each parameter's axis labels, and every tensor's shape at rate 1.

    `groups` maps a group's name (its first parameter axis, e.g. `conv1.weight[0]`) to its size
    and, for a pinned group, the reason; `cuts` maps each parameter to the group name cutting each
    of its axes (None: kept whole).
    """

    groups: Mapping[str, tuple[int, str | None]]
    cuts: Mapping[str, tuple[str | None, ...]]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    labels: Mapping[str, tuple[Axis, ...]]  # every tensor: its axes' labels (groups by representative id)
    group_names: Mapping[int, str]  # representative id -> group name
    shapes: Mapping[str, tuple[int, ...]]  # every tensor at rate 1, batch as exported

    @property
    def cuttable(self) -> bool:
        """True when at least one group is cut at narrower tiers."""
        return any(pinned is None and size > 1 for size, pinned in self.groups.values())

    def kept(self, axis: Axis, full: int, rate: float) -> int:
        """Elements a tier at `rate` keeps of an axis of `full` elements (-1 for the batch)."""
        if axis.group == BATCH:
            return -1
        name = self.group_names.get(axis.group)
        if name is None or self.groups[name][1] is not None:
            return full
        return scaled_width(self.groups[name][0], rate) * axis.inner

    def param_shape(self, name: str, rate: float) -> tuple[int, ...]:
        """A parameter's shape at `rate`."""
        return tuple(self.kept(a, f, rate) for a, f in zip(self.labels[name], self.shapes[name]))

    def param_shapes(self, rate: float) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape at `rate`, trainable first then frozen (graph order within each)."""
        return {n: self.param_shape(n, rate) for n in (*self.trainable, *self.frozen)}

    def blockers(self) -> list[str]:
        """Why each pinned group stays whole, one line per group."""
        return [f"{name} ({size} channels): {why}" for name, (size, why) in self.groups.items()
                if why is not None and not why.startswith("fixed:")]


class _Walk:
    """One pass over the graph in order, labelling every tensor's axes."""

    def __init__(self, model: onnx.ModelProto, params: Sequence[str]) -> None:
        self.graph = model.graph
        self.shapes = infer_shapes(model)
        self.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.groups = _Groups()
        self.params = set(params)
        self.labels: dict[str, list[Axis]] = {}
        self.first_axis: dict[int, str] = {}
        self.fresh: set[int] = set()  # parameter axes not tied to anything yet
        self.alias: dict[int, Axis] = {}  # a fresh axis that took another axis's label (Flatten's blocks)
        for name in params:  # every parameter axis starts as a group of its own
            self.labels[name] = []
            for i, size in enumerate(self.shapes[name]):
                group = self.groups.new(size)
                self.first_axis[group] = f"{name}[{i}]"
                self.fresh.add(group)
                self.labels[name].append(Axis(group))
        shape = self.shapes[INPUT_NAME]
        self.labels[INPUT_NAME] = [_BATCH] + [_FIXED] * (len(shape) - 1)

    # ---- labels -------------------------------------------------------------------------------

    def of(self, name: str) -> list[Axis]:
        """The labels of a tensor (a constant that is no parameter: every axis fixed)."""
        if name not in self.labels:
            self.labels[name] = [_FIXED] * len(self.shapes[name])
        return [self.resolve(a) for a in self.labels[name]]

    def resolve(self, axis: Axis) -> Axis:
        """The label an axis stands for now (following a fresh axis's alias)."""
        while axis.group in self.alias:
            axis = self.alias[axis.group]
        return axis

    def unify(self, a: Axis, b: Axis, why: str) -> Axis:
        """One label for two axes that must be cut alike (a fixed axis pins the other's group)."""
        a, b = self.resolve(a), self.resolve(b)
        if a.inner != b.inner:  # a fresh parameter axis takes a merged axis's label (Flatten -> Gemm)
            for fresh, other in ((a, b), (b, a)):
                other_size = self.groups.size[self.groups.find(other.group)] * other.inner if other.group > 0 else 0
                if fresh.group in self.fresh and other.group not in (BATCH, FIXED) and fresh.inner == 1 \
                        and self.groups.size[fresh.group] == other_size:
                    self.fresh.discard(fresh.group)
                    self.alias[fresh.group] = other
                    return other
        for fresh, other in ((a, b), (b, a)):  # a fresh parameter axis meeting a fixed one is no group at all
            if fresh.group in self.fresh and other == _FIXED:
                self.fresh.discard(fresh.group)
                self.alias[fresh.group] = _FIXED
                return _FIXED
        self.fresh.discard(a.group)
        self.fresh.discard(b.group)
        if a.group == BATCH or b.group == BATCH:
            if a != b:
                raise UnsupportedModel(f"{why}: the batch axis meets a channel axis")
            return a
        if a.group == FIXED or b.group == FIXED:
            self.fix(a, why)
            self.fix(b, why)
            return b if a.group == FIXED else a
        if a.inner != b.inner:  # one group's channels against another's blocks: both stay whole
            self.fix(a, f"{why}: channels of different sizes meet")
            self.fix(b, f"{why}: channels of different sizes meet")
            return _FIXED
        return Axis(self.groups.join(a.group, b.group, why), a.inner)

    def fix(self, axis: Axis, why: str) -> None:
        """Keep the axis's group whole."""
        axis = self.resolve(axis)
        if axis.group in self.fresh:  # a parameter axis of its own (a kernel's height): no group
            self.fresh.discard(axis.group)
            self.alias[axis.group] = _FIXED
        elif axis.group not in (BATCH, FIXED):
            self.groups.pin(axis.group, why)

    def set(self, name: str, labels: Sequence[Axis]) -> None:
        """Label a node output (a size-1 axis is always fixed)."""
        sizes = self.shapes[name]
        self.labels[name] = [_FIXED if size == 1 and a.group != BATCH else a for a, size in zip(labels, sizes)]

    def broadcast(self, node: onnx.NodeProto, why: str) -> None:
        """Elementwise with numpy broadcasting: the inputs' axes spanning an output axis get one label."""
        out_shape = self.shapes[node.output[0]]
        rank = len(out_shape)
        result: list[Axis | None] = [None] * rank
        for name in node.input:
            if not name:
                continue
            shape, labels = self.shapes[name], self.of(name)
            for k, (size, axis) in enumerate(zip(shape, labels), start=rank - len(shape)):
                if size == out_shape[k] and size > 1:
                    current = result[k]
                    result[k] = axis if current is None else self.unify(current, axis, why)
                else:
                    self.fix(axis, why)  # broadcast from size 1
        self.set(node.output[0], [_FIXED if a is None else a for a in result])

    # ---- operators ----------------------------------------------------------------------------

    def walk(self) -> None:
        """Label every tensor, node by node."""
        for node in self.graph.node:
            why = f"node {node.name or node.output[0]!r} ({node.op_type})"
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                self.broadcast(node, why)  # elementwise: unary activations, Add/Mul/Sub/Div/Pow
            else:
                handler(node, why)
        logits = self.of(OUTPUT_NAME)
        self.fix(logits[1], "fixed: the classes")
        for axis in self.labels[INPUT_NAME][1:]:
            self.fix(axis, "fixed: the input")

    def _op_Clip(self, node: onnx.NodeProto, why: str) -> None:
        self.set(node.output[0], self.of(node.input[0]))

    _op_LeakyRelu = _op_Relu = _op_Sigmoid = _op_HardSigmoid = _op_HardSwish = _op_Tanh = _op_Erf = _op_Clip
    _op_Sqrt = _op_Gelu = _op_Clip

    def _op_Conv(self, node: onnx.NodeProto, why: str) -> None:
        x, w, *bias = node.input
        xl, wl = self.of(x), self.of(w)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        for axis in wl[2:]:
            self.fix(axis, why)
        out = wl[0]
        if group == 1:
            self.unify(xl[1], wl[1], why)
        elif group == self.shapes[x][1] == self.shapes[w][0]:  # depthwise: channel c only sees channel c
            out = self.unify(xl[1], wl[0], why)
            self.fix(wl[1], why)
        else:
            for axis in (xl[1], wl[0], wl[1]):
                self.fix(axis, f"{why}: a grouped convolution ({group} groups) is kept whole")
            out = _FIXED
        if bias:
            out = self.unify(out, self.of(bias[0])[0], why)
        self.fresh.discard(out.group)  # a layer's output channels: a group from now on
        self.set(node.output[0], [xl[0], out, *[_FIXED] * (len(xl) - 2)])

    def _op_Gemm(self, node: onnx.NodeProto, why: str) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        a, b, *c = node.input
        al, bl = self.of(a), self.of(b)
        if attrs.get("transA", 0):
            al = al[::-1]
        if attrs.get("transB", 0):
            bl = bl[::-1]
        self.unify(al[1], bl[0], why)
        self.fresh.discard(bl[1].group)
        self.set(node.output[0], [al[0], bl[1]])
        if c:
            self.broadcast(helper.make_node("Add", [node.output[0], c[0]], [node.output[0]]), why)

    def _op_MatMul(self, node: onnx.NodeProto, why: str) -> None:
        a, b = node.input
        al, bl = self.of(a), self.of(b)
        if len(al) < 2 or len(bl) < 2:
            raise UnsupportedModel(f"{why}: a MatMul of a vector is not supported")
        self.unify(al[-1], bl[-2], why)
        out_rank = len(self.shapes[node.output[0]])
        batch_dims: list[Axis] = []
        for k in range(out_rank - 2):  # broadcast the leading (batch) axes
            picks = [lab[len(lab) - out_rank + k] for lab in (al, bl) if len(lab) - out_rank + k >= 0]
            shapes = [self.shapes[n][len(self.shapes[n]) - out_rank + k] for n in (a, b)
                      if len(self.shapes[n]) - out_rank + k >= 0]
            spanning = [p for p, s in zip(picks, shapes) if s > 1]
            label = spanning[0] if spanning else _FIXED
            for other in spanning[1:]:
                label = self.unify(label, other, why)
            batch_dims.append(label)
        self.fresh.discard(bl[-1].group)
        self.set(node.output[0], [*batch_dims, al[-2], bl[-1]])

    def _op_BatchNormalization(self, node: onnx.NodeProto, why: str) -> None:
        xl = self.of(node.input[0])
        channel = xl[1]
        for param in node.input[1:]:
            channel = self.unify(channel, self.of(param)[0], why)
        self.set(node.output[0], [xl[0], channel, *xl[2:]])

    def _op_LayerNormalization(self, node: onnx.NodeProto, why: str) -> None:
        xl = list(self.of(node.input[0]))
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1) % len(xl)
        for param in node.input[1:]:
            if not param:
                continue
            pl = self.of(param)
            offset = len(xl) - len(pl)
            for i, label in enumerate(pl):
                if offset + i < axis:
                    raise UnsupportedModel(f"{why}: a scale wider than the normalized axes")
                xl[offset + i] = self.unify(xl[offset + i], label, why)
        self.set(node.output[0], xl)

    def _op_MaxPool(self, node: onnx.NodeProto, why: str) -> None:
        xl = self.of(node.input[0])
        self.set(node.output[0], [xl[0], xl[1], *[_FIXED] * (len(xl) - 2)])

    _op_AveragePool = _op_GlobalAveragePool = _op_GlobalMaxPool = _op_MaxPool

    def _op_ReduceMean(self, node: onnx.NodeProto, why: str) -> None:
        xl = self.of(node.input[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = [a % len(xl) for a in attrs.get("axes", range(len(xl)))]
        for a in axes:
            self.fix(xl[a], f"{why}: it averages over a channel axis")
        keep = attrs.get("keepdims", 1)
        out = [(_FIXED if i in axes else label) for i, label in enumerate(xl) if keep or i not in axes]
        self.set(node.output[0], out)

    def _op_Softmax(self, node: onnx.NodeProto, why: str) -> None:
        xl = self.of(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1) % len(xl)
        self.fix(xl[axis], f"{why}: it normalizes over a channel axis")
        self.set(node.output[0], xl)

    def _op_Transpose(self, node: onnx.NodeProto, why: str) -> None:
        xl = self.of(node.input[0])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(xl)))[::-1])
        self.set(node.output[0], [xl[p] for p in perm])

    def _op_Flatten(self, node: onnx.NodeProto, why: str) -> None:
        xl, shape = self.of(node.input[0]), self.shapes[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(len(xl), 1)
        self.set(node.output[0], [self._merge(xl[:axis], shape[:axis], why), self._merge(xl[axis:], shape[axis:], why)])

    def _merge(self, labels: Sequence[Axis], sizes: Sequence[int], why: str) -> Axis:
        """One axis made of several: a group's channels outermost with fixed axes inside keep their block."""
        spanning = [(a, s) for a, s in zip(labels, sizes) if s > 1]
        if not spanning:
            return labels[0] if labels and labels[0].group == BATCH else _FIXED
        if len(spanning) == 1 and spanning[0][0].group == BATCH:
            return _BATCH
        if any(a.group == BATCH for a, _ in spanning):
            raise UnsupportedModel(f"{why}: it merges the batch axis with others")
        head, rest = spanning[0], spanning[1:]
        if all(self.groups.is_pinned(a.group) for a, _ in spanning):
            return _FIXED
        if all(self.groups.is_pinned(a.group) for a, _ in rest):
            return Axis(head[0].group, head[0].inner * math.prod(s for _, s in rest))
        for axis, _ in spanning:
            self.fix(axis, f"{why}: it merges a channel axis after another axis")
        return _FIXED

    def _op_Reshape(self, node: onnx.NodeProto, why: str) -> None:
        x, out = node.input[0], node.output[0]
        xl, src, dst = self.of(x), self.shapes[x], self.shapes[out]
        if node.input[1] not in self.constants:
            raise UnsupportedModel(f"{why}: its shape is computed at run time; export with fixed shapes")
        labels: list[Axis] = []
        i = j = 0
        while i < len(src) or j < len(dst):  # walk blocks of axes with equal products
            i0, j0 = i, j
            a = src[i] if i < len(src) else 1
            b = dst[j] if j < len(dst) else 1
            i, j = i + 1, j + 1
            while a != b:
                if a < b:
                    a *= src[i]
                    i += 1
                else:
                    b *= dst[j]
                    j += 1
            labels += self._reshape_block(xl[i0:i], src[i0:i], dst[j0:j], why)
        self.set(out, labels[: len(dst)])

    def _reshape_block(self, labels: Sequence[Axis], src: Sequence[int], dst: Sequence[int], why: str) -> list[Axis]:
        """Labels of `dst` axes made from `src` axes of the same total size."""
        if not dst:
            return []
        merged = self._merge(labels, src, why) if labels else _FIXED
        spanning = [k for k, size in enumerate(dst) if size > 1]
        if merged.group == BATCH or self.groups.is_pinned(merged.group):
            if merged.group == BATCH and len(spanning) > 1:
                raise UnsupportedModel(f"{why}: it splits the batch axis")
            out = [_FIXED] * len(dst)
            if merged.group != BATCH and len(spanning) == 1 and dst[spanning[0]] == math.prod(src):
                out[spanning[0]] = merged  # one axis to one axis: a pinned group stays itself
            if merged.group == BATCH:
                out[spanning[0] if spanning else 0] = _BATCH
            return out
        head = spanning[0]
        rest = math.prod(dst[head + 1:])
        channels = self.groups.size[self.groups.find(merged.group)]
        if dst[head] % channels == 0 and merged.inner == (dst[head] // channels) * rest:
            out = [_FIXED] * len(dst)
            out[head] = Axis(merged.group, dst[head] // channels)
            return out
        self.fix(merged, f"{why}: it splits a channel axis")
        return [_FIXED] * len(dst)

    def _op_Squeeze(self, node: onnx.NodeProto, why: str) -> None:
        xl, shape = self.of(node.input[0]), self.shapes[node.input[0]]
        axes = self._axes(node, len(xl))
        if axes is None:
            axes = [i for i, s in enumerate(shape) if s == 1]
        self.set(node.output[0], [a for i, a in enumerate(xl) if i not in axes])

    def _op_Unsqueeze(self, node: onnx.NodeProto, why: str) -> None:
        xl = list(self.of(node.input[0]))
        rank = len(self.shapes[node.output[0]])
        for axis in sorted(self._axes(node, rank) or []):
            xl.insert(axis, _FIXED)
        self.set(node.output[0], xl)

    def _axes(self, node: onnx.NodeProto, rank: int) -> list[int] | None:
        """A Squeeze/Unsqueeze's axes (input or attribute), normalized; None when absent."""
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.constants:
                raise UnsupportedModel(f"node {node.name!r}: axes computed at run time")
            return [int(a) % rank for a in self.constants[node.input[1]].reshape(-1)]
        attr = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        return None if attr is None else [a % rank for a in attr]

    def _op_Concat(self, node: onnx.NodeProto, why: str) -> None:
        axis = next(a.i for a in node.attribute if a.name == "axis")
        rank = len(self.shapes[node.output[0]])
        axis %= rank
        inputs = [n for n in node.input if n]
        out = list(self.of(inputs[0]))
        for other in inputs[1:]:
            for k, label in enumerate(self.of(other)):
                if k != axis:
                    out[k] = self.unify(out[k], label, why)
        for name in inputs:
            self.fix(self.of(name)[axis], f"{why}: a Concat of channel groups is kept whole")
        if any(self.of(n)[axis].group == BATCH for n in inputs):
            raise UnsupportedModel(f"{why}: a Concat along the batch axis")
        out[axis] = _FIXED
        self.set(node.output[0], out)


def _parameters(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(trainable, frozen): float initializers of more than one element; frozen = BatchNorm running statistics."""
    trainable, frozen = [], []
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or math.prod(tensor.dims) < 2:
            continue
        (frozen if tensor.name.endswith(RUNNING_STATISTICS) else trainable).append(tensor.name)
    return trainable, frozen


def analyse(model: onnx.ModelProto) -> WidthPlan:
    """The width plan of a normalized forward graph (models.onnx_import)."""
    trainable, frozen = _parameters(model)
    walk = _Walk(model, [*trainable, *frozen])
    walk.walk()
    groups = walk.groups
    names: dict[int, str] = {}
    for group, first in walk.first_axis.items():  # name each group by its first parameter axis
        root = walk.resolve(Axis(group)).group
        if root not in (BATCH, FIXED):
            names.setdefault(groups.find(root), first)
    plan_groups = {names[r]: (groups.size[r], groups.pinned.get(r)) for r in sorted(names)}
    resolved = {t: walk.of(t) for t in walk.labels}
    labels = {t: tuple(a if a.group in (BATCH, FIXED) else Axis(groups.find(a.group), a.inner) for a in axes)
              for t, axes in resolved.items()}
    cuts: dict[str, tuple[str | None, ...]] = {}
    for name in (*trainable, *frozen):
        roots = [a.group for a in labels[name]]
        cuts[name] = tuple(names[r] if r in names and plan_groups[names[r]][1] is None else None for r in roots)
    return WidthPlan(
        groups=plan_groups, cuts=cuts, trainable=tuple(trainable), frozen=tuple(frozen),
        labels=labels, group_names=names,
        shapes={t: tuple(s) for t, s in walk.shapes.items()},
    )
