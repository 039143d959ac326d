"""INT8 graph analysis: what to quantize, what must stay float32, and the repair after ONNX Runtime's Q/DQ insertion.

Split out of quantize.py (which re-exports these names).
"""

from __future__ import annotations

from collections import defaultdict, deque

import onnx

from adtr_deploy.export.formats import QUANT_SCOPES
from adtr_deploy.export.fp16 import ELEMENTWISE_OPS, downstream, is_residual_whitening, map_tail_starts

KEEP_FP32_OPS: frozenset[str] = frozenset({"LayerNormalization", "Softmax"})
WEIGHT_INPUT = {"Conv": 1, "MatMul": 1, "Gemm": 1}  # which input of a quantizable op holds its weight
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# --- graph analysis --------------------------------------------------------------------------------------------------


def name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def constants_of(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def map_node_names(model: onnx.ModelProto) -> set[str]:
    """The anomaly-map part: the error (the Sub/Pow feeding the reduction, and the Mahalanobis whitening between them),
    the reduction, and all after it."""
    graph = model.graph
    consumers = consumers_of(graph)
    producer = {o: n for n in graph.node for o in n.output}
    starts = map_tail_starts(graph, consumers)
    # forward: the reduction and all after it (upsampling, blur, pooling, max)
    tail = set(downstream(starts, consumers))
    queue = deque(starts)
    while queue:  # backward: the elementwise chain (Pow, whitening, Sub) that only feeds the map
        node = queue.popleft()
        for name in node.input:
            prev = producer.get(name)
            if prev is None or prev.name in tail:
                continue
            if prev.op_type not in ELEMENTWISE_OPS | {"Pow"} and not is_residual_whitening(prev, producer):
                continue
            if all(c.name in tail for out in prev.output for c in consumers.get(out, ())):
                tail.add(prev.name)
                queue.append(prev)
    return tail


def protected_node_names(model: onnx.ModelProto) -> set[str]:
    """Nodes that must compute in FP32 from FP32 inputs: LayerNorm, Softmax and the anomaly-map part."""
    return {n.name for n in model.graph.node if n.op_type in KEEP_FP32_OPS} | map_node_names(model)


# Ops a value passes through unchanged in kind between the reconstruction head and the map (layout, bias, scale).
PASS_THROUGH_OPS = frozenset({"Add", "Mul", "Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "Identity"})


def reconstruction_head_names(model: onnx.ModelProto) -> set[str]:
    """The weighted ops whose output reaches the anomaly map's L2 error through pass-through ops only: the transformer's
    output projection (the reconstruction itself; the map is its small difference from the features)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    tail = map_node_names(model)
    queue = deque(i for n in graph.node if n.name in tail for i in n.input)
    seen, heads = set(), set()
    while queue:
        name = queue.popleft()
        node = producer.get(name)
        if node is None or node.name in seen or node.name in tail:
            continue
        seen.add(node.name)
        if node.op_type in WEIGHT_INPUT and node.op_type != "Conv":
            heads.add(node.name)
        elif node.op_type in PASS_THROUGH_OPS:
            queue.extend(node.input)
    return heads


def plan_nodes(
    model: onnx.ModelProto, scope: str, fp32_head: bool = False, fp32_lead: float = 0.0
) -> tuple[list[str], dict[str, str]]:
    """(names of the nodes to quantize, {name of a weighted node kept FP32: why}) for a QUANT_SCOPES scope;
    `fp32_head` also keeps the reconstruction head (the output projection) in FP32, `fp32_lead` the first fraction of
    the quantizable nodes in graph order (a topological order: the encoder's before the decoder's)."""
    op_types = QUANT_SCOPES[scope]
    graph = model.graph
    consts = constants_of(graph)
    in_map = map_node_names(model)
    head = reconstruction_head_names(model) if fp32_head else set()
    quantize, kept = [], {}
    for node in graph.node:
        if node.op_type not in WEIGHT_INPUT:
            continue
        if node.name in in_map:
            kept[node.name] = "part of the anomaly map"
        elif node.name in head:
            kept[node.name] = "the reconstruction head (output projection)"
        elif node.input[WEIGHT_INPUT[node.op_type]] not in consts:
            kept[node.name] = "activation x activation (attention)"
        elif node.op_type not in op_types:
            kept[node.name] = f"outside the quantization scope {scope!r}"
        else:
            quantize.append(node.name)
    lead = int(round(fp32_lead * len(quantize)))
    for name in quantize[:lead]:
        kept[name] = f"the first {fp32_lead:.0%} of the quantizable ops (map fidelity)"
    return quantize[lead:], kept


def fp32_violations(model: onnx.ModelProto) -> list[str]:
    """Protected nodes (LayerNorm, Softmax, the map) with an input straight out of a DequantizeLinear or a dynamic
    quantization, and quantize nodes reading the uint8 image; [] for a well-formed INT8 graph."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    protected = protected_node_names(model)
    problems = []
    for node in graph.node:
        if node.name not in protected:
            continue
        for name in node.input:
            prev = producer.get(name)
            if prev is not None and prev.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
                problems.append(f"{node.op_type} {node.name!r} reads {prev.op_type} output {name!r}")
    inputs = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") and node.input[0] in inputs:
            problems.append(f"the graph input {node.input[0]!r} is quantized by {node.name!r}")
    return problems


def restore_fp32_inputs(model: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Rewire inputs of protected nodes that come straight out of a DequantizeLinear back to FP32; returns how many.

    An activation goes back to the tensor its QuantizeLinear read; a dequantized initializer (ONNX Runtime dedupes
    equal initializers, so a LayerNorm bias can share a quantized Conv bias) becomes an FP32 copy of the original.
    Q/DQ nodes and initializers nobody reads any more are removed.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    floats = {t.name: t for t in original.graph.initializer}
    have = {t.name for t in graph.initializer}
    protected = protected_node_names(model)
    restored = 0
    for node in graph.node:
        if node.name not in protected:
            continue
        for idx, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[idx] = q.input[0]
            elif name in floats:
                copy = f"{name}__fp32"
                if copy not in have:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(floats[name])
                    tensor.name = copy
                    graph.initializer.append(tensor)
                    have.add(copy)
                node.input[idx] = copy
            else:
                continue
            restored += 1
    _prune(graph)
    return restored


def _prune(graph: onnx.GraphProto) -> None:
    """Drop Q/DQ nodes whose outputs nobody reads (to a fixed point), then unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for n in graph.node for name in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {name for n in graph.node for name in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        counts[node.op_type] += 1
    return dict(sorted(counts.items()))
