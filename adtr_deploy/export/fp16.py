"""FP16 conversion of an ONNX graph, written with the onnx API, keeping the numerically fragile parts in FP32.

What stays FP32 and why:
- LayerNormalization and Softmax: their reductions (variance, sum of exponentials) lose too much in half precision.
- The anomaly map and score: the L2 reconstruction error (Sub -> Pow -> ReduceSum -> Sqrt) is a small difference of two
  large feature vectors, so it is computed in FP32 from FP16 features, and everything after it (upsampling, blur, pooling,
  the max that gives the score) stays FP32 too.
- The Mahalanobis error's whitening (a 1x1 Conv on the residual, model/adtr.py token_errors) belongs to the map: it
  scales the small residual by up to 1/sqrt(shrink) and must not see it rounded.
- The graph's inputs and outputs keep their types: uint8 images in, float32 map and score out.

Elementwise arithmetic whose every consumer runs in FP32 (the residual adds before a LayerNorm, the Sub of the L2 map)
joins the FP32 side, so a value is not rounded to FP16 only to be cast straight back.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from adtr_deploy.errors import UserError

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16

# Ops that always run in FP32.
FP32_OPS: frozenset[str] = frozenset(
    {
        "LayerNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceMean",
        "ReduceL2",
        "ReduceMax",
        "Sqrt",
        "Pow",
        "AveragePool",
        "GlobalAveragePool",
    }
)
# Ops that start the FP32 tail: every node downstream of them (the map and the score) stays FP32.
FP32_TAIL_OPS: frozenset[str] = frozenset({"ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt"})
# Ops only the network before the map has (the transformer): a tail op with one of them downstream is not the map's
# reduction but, e.g., the per-image input standardization's Sqrt (input_norm "image"), whose downstream is everything.
NETWORK_OPS: frozenset[str] = frozenset({"MatMul", "Gemm", "LayerNormalization", "Softmax"})
# Elementwise ops that may join the FP32 side when all their consumers are there.
ELEMENTWISE_OPS: frozenset[str] = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs"})
# Weighted ops; one applied straight to a difference (Sub) is the Mahalanobis error's whitening, part of the map.
WEIGHTED_OPS: frozenset[str] = frozenset({"Conv", "MatMul", "Gemm"})
# Inputs that must stay float32 whatever the node's precision (by the operator's type constraints).
FLOAT32_ONLY_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}

FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Fp16Report:
    """What the conversion did, for the export's model.json."""

    fp16_nodes: int
    fp32_nodes: int
    casts: int
    fp32_ops: tuple[str, ...]  # op types that kept FP32 somewhere in the graph
    clipped_initializers: int  # float32 weights beyond the FP16 range, clipped to +-65504

    def to_dict(self) -> dict:
        return {
            "fp16_nodes": self.fp16_nodes,
            "fp32_nodes": self.fp32_nodes,
            "casts": self.casts,
            "fp32_ops": list(self.fp32_ops),
            "clipped_initializers": self.clipped_initializers,
        }


def _lift_float_constants(graph: onnx.GraphProto) -> None:
    """Constant nodes holding float tensors -> initializers, so every float weight is handled in one place."""
    keep = []
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and attr.t.data_type == FLOAT:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def is_residual_whitening(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether `node` is the Mahalanobis error's whitening: a Conv/MatMul/Gemm whose data input is a difference."""
    prev = producer.get(node.input[0]) if node.input else None
    return node.op_type in WEIGHTED_OPS and prev is not None and prev.op_type == "Sub"


def downstream(starts, consumers, stop=None) -> dict[str, onnx.NodeProto]:
    """The nodes reachable from `starts` (included) along their outputs, by name; a node for which `stop(node)` is true
    is neither included nor followed."""
    found: dict[str, onnx.NodeProto] = {}
    queue = deque(starts)
    while queue:
        node = queue.popleft()
        if node.name in found or (stop is not None and stop(node)):
            continue
        found[node.name] = node
        queue.extend(c for out in node.output for c in consumers.get(out, ()))
    return found


def map_tail_starts(graph: onnx.GraphProto, consumers) -> list[onnx.NodeProto]:
    """The nodes that start the map's FP32 tail: FP32_TAIL_OPS with no NETWORK_OPS downstream of them."""
    return [
        start
        for start in graph.node
        if start.op_type in FP32_TAIL_OPS
        and not any(n.op_type in NETWORK_OPS for n in downstream([start], consumers).values())
    ]


def fp32_node_names(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that keep FP32 (see the module docstring). Node names must be unique and non-empty."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)
    fp32 = {n.name for n in graph.node if n.op_type in FP32_OPS}
    # Forward closure from the L2 map: the map, its upsampling and the score (an FP32 op already kept is not followed).
    starts = map_tail_starts(graph, consumers)
    kept, start_names = set(fp32), {n.name for n in starts}
    fp32 |= set(downstream(starts, consumers, stop=lambda n: n.name in kept and n.name not in start_names))
    # Backward: elementwise ops (and the residual's whitening) whose every consumer is FP32 join it (to a fixed point;
    # stops at any other op).
    graph_outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.name in fp32 or not (node.op_type in ELEMENTWISE_OPS or is_residual_whitening(node, producer)):
                continue
            users = [u for out in node.output for u in consumers.get(out, ())]
            feeds_output = any(out in graph_outputs for out in node.output)
            if (users or feeds_output) and all(u.name in fp32 for u in users):
                fp32.add(node.name)
                changed = True
    # The input prologue: what the image goes through before the first weighted op (the cast, the per-image
    # standardization of input_norm "image": statistics over a whole image, elementwise on it) stays FP32; it is cheap,
    # and in FP16 its rounding reaches every later layer.
    inputs = [c for i in graph.input for c in consumers.get(i.name, ())]
    fp32 |= set(downstream(inputs, consumers, stop=lambda n: n.name in fp32 or n.op_type in WEIGHTED_OPS))
    return fp32


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise UserError(f"the graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def convert_to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Fp16Report]:
    """Return an FP16 copy of `model` (float32 weights and activations -> float16), the fragile parts kept FP32.

    Graph inputs and outputs keep their types. The result passes onnx.checker and strict shape inference.
    """
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UserError(
                f"the FP16 conversion handles graphs without control flow; node {node.name!r} has a subgraph"
            )
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    _lift_float_constants(graph)
    types = _elem_types(out)
    fp32 = fp32_node_names(out)
    producer = {name: node for node in graph.node for name in node.output}
    initializers = {t.name: t for t in graph.initializer}

    # Precision of every float tensor as produced (graph inputs keep float32).
    produced: dict[str, int] = {}
    for node in graph.node:
        half = node.name not in fp32
        for name in node.output:
            if types.get(name) == FLOAT:
                produced[name] = FLOAT16 if half else FLOAT
        if half and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16

    # Which precision each consumer wants for each float input.
    init_wants: dict[str, set[int]] = defaultdict(set)
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast_of(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"Cast_{casts[key]}"))
        return casts[key]

    for node in graph.node:
        half = node.name not in fp32
        keep32 = FLOAT32_ONLY_INPUTS.get(node.op_type, frozenset())
        for idx, name in enumerate(node.input):
            if not name or types.get(name) != FLOAT:
                continue
            want = FLOAT16 if half and idx not in keep32 else FLOAT
            if name in initializers:
                init_wants[name].add(want)
                if want == FLOAT16:
                    node.input[idx] = f"{name}__fp16"  # resolved below: renamed or a converted copy
                continue
            have = produced.get(name, FLOAT)
            if have != want:
                node.input[idx] = cast_of(name, want)

    # Initializers: convert in place when only FP16 consumers read them, else keep FP32 and add an FP16 copy.
    clipped = 0
    for name, wants in init_wants.items():
        if FLOAT16 not in wants:
            continue
        src = numpy_helper.to_array(initializers[name])
        if np.abs(src).max(initial=0.0) > FP16_MAX:
            clipped += 1
        half = numpy_helper.from_array(np.clip(src, -FP16_MAX, FP16_MAX).astype(np.float16), f"{name}__fp16")
        if wants == {FLOAT16}:
            graph.initializer.remove(initializers[name])
        graph.initializer.append(half)

    # Graph outputs keep float32: a half-precision output gets a final Cast under its original name.
    for output in graph.output:
        name = output.name
        if produced.get(name) == FLOAT16:
            inner = f"{name}__fp16_out"
            node = producer[name]
            node.output[list(node.output).index(name)] = inner
            for other in graph.node:
                for idx, inp in enumerate(other.input):
                    if inp == name:
                        other.input[idx] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [name], to=FLOAT, name=f"Cast_{name}_out"))

    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale types; strict inference below re-derives and checks them
    _topological_sort(graph)
    out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    onnx.checker.check_model(out)
    kept_ops = tuple(sorted({n.op_type for n in graph.node if n.name in fp32}))
    report = Fp16Report(
        fp16_nodes=len(graph.node) - len(new_nodes) - len(fp32),
        fp32_nodes=len(fp32),
        casts=len(new_nodes),
        fp32_ops=kept_ops,
        clipped_initializers=clipped,
    )
    return out, report
