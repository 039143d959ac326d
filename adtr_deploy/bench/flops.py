"""FLOPs per image, counted two independent ways: on the PyTorch module and on the exported ONNX graph.

Both count the multiply-accumulates of convolutions and matrix products (2 FLOPs per MAC, biases and element-wise ops not
counted): that is where the compute is, and what the machine's matrix-multiply peak bounds. The two counts must agree; the
report shows both and their relative difference.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _subtree_flops(counts: dict[str, int], name: str) -> int:
    """FLOPs of a module from the counter's per-module table. A module called through a method other than forward
    (e.g. backbone.forward_stages) has no entry of its own: sum its direct children instead."""
    if name in counts:
        return counts[name]
    prefix = name + "."
    kids = {n[len(prefix) :].split(".", 1)[0] for n in counts if n.startswith(prefix)}
    return sum(_subtree_flops(counts, prefix + k) for k in kids)


def torch_flops(model: Any, input_size: tuple[int, int], batch: int = 1) -> dict:
    """Count the FLOPs of one forward pass of `model` (uint8 NHWC input) with torch.utils.flop_counter.FlopCounterMode.

    Returns total and per-image FLOPs, per operator, and per top-level sub-module (e.g. backbone vs transformer).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = input_size
    # Counting only looks at shapes, but real-looking pixels keep any data-dependent path honest.
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8))
    with torch.inference_mode(), FlopCounterMode(display=False, depth=16) as counter:
        model(x)
    total = int(counter.get_total_flops())
    table = counter.get_flop_counts()
    counts = {name: int(sum(ops.values())) for name, ops in table.items()}
    root = type(model).__name__
    children = [name for name, _ in model.named_children()]
    by_module = {c: _subtree_flops(counts, f"{root}.{c}") for c in children}
    by_module = {c: v for c, v in by_module.items() if v}
    by_op = {str(op).replace("aten.", ""): int(v) for op, v in table.get("Global", {}).items()}
    return {
        "method": "torch.utils.flop_counter.FlopCounterMode",
        "batch": batch,
        "total_flops": total,
        "flops_per_image": total / batch,
        "by_module": by_module,
        "by_op": by_op,
    }


def _dims(value_info) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if any(d is None for d in dims) else dims


def _matmul_flops(a: list[int], b: list[int]) -> int:
    """2*M*K*N per product, times the broadcast batch dimensions (numpy matmul semantics)."""
    if len(a) == 1:
        a = [1, *a]
    if len(b) == 1:
        b = [*b, 1]
    m, k, n = a[-2], a[-1], b[-1]
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return 2 * int(np.prod(batch, dtype=np.int64)) * m * k * n


FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _runtime_shapes(path: str | Path, names: list[str], batch: int) -> dict[str, list[int]]:
    """Shapes of intermediate tensors from one ONNX Runtime run at `batch`, exposing them as extra graph outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))  # with external weights: the session is built from bytes
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor we ask for
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        dtype = {"tensor(uint8)": np.uint8, "tensor(float16)": np.float16}.get(inp.type, np.float32)
        feeds[inp.name] = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    outs = sess.run(names, feeds)
    return {n: list(o.shape) for n, o in zip(names, outs)}


def onnx_flops(path: str | Path, batch: int = 1) -> dict:
    """Count Conv / MatMul / Gemm FLOPs by walking the ONNX graph with shapes inferred at a fixed batch size."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)  # shapes only: the weights stay on disk
    graph = model.graph
    for inp in graph.input:  # pin every symbolic (batch) axis so every shape becomes concrete
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = batch
    del graph.value_info[:]
    for out in graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.Clear()
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes: dict[str, list[int] | None] = {}
    for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
        shapes[vi.name] = _dims(vi)
    for init in inferred.initializer:
        shapes[init.name] = list(init.dims)
    for node in inferred.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)

    wanted = {i for n in inferred.node if n.op_type in FLOP_OPS for i in (*n.input[:2], n.output[0])}
    missing = sorted(n for n in wanted if shapes.get(n) is None)
    method = "onnx.shape_inference"
    if missing:  # shapes computed at run time (e.g. pads built from Shape ops): ask ONNX Runtime for the real ones
        shapes.update(_runtime_shapes(path, missing, batch))
        method += " + ONNX Runtime for shapes computed at run time"

    by_op: Counter = Counter()
    unknown: list[str] = []
    for node in inferred.node:
        if node.op_type not in FLOP_OPS:
            continue
        ins = [shapes.get(i) for i in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(s is None for s in ins) or (node.op_type.startswith("Conv") and out is None):
            unknown.append(node.name or node.op_type)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w = ins[1]  # (Cout, Cin/group, kh, kw)
            flops = 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            w = ins[1]  # (Cin, Cout/group, kh, kw): every input pixel scatters into Cout/group * kh * kw outputs
            flops = 2 * int(np.prod(ins[0], dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "MatMul":
            flops = _matmul_flops(ins[0], ins[1])
        else:  # Gemm: (M, K) x (K, N), either side possibly transposed
            a, b = ins
            m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            n = b[0] if attrs.get("transB", 0) else b[1]
            flops = 2 * m * k * n
        by_op[node.op_type] += flops
    total = int(sum(by_op.values()))
    return {
        "method": f"ONNX graph walk over {', '.join(FLOP_OPS)}; shapes from {method}",
        "batch": batch,
        "total_flops": total,
        "flops_per_image": total / batch,
        "by_op": dict(by_op),
        "nodes_without_shape": unknown,
    }


def count_flops(model: Any | None, onnx_path: str | Path | None, input_size: tuple[int, int]) -> dict:
    """Both counts where possible, their agreement, and the figure the report uses (`flops_per_image`)."""
    out: dict = {"torch": None, "onnx": None}
    if model is not None:
        out["torch"] = torch_flops(model, input_size)
    if onnx_path is not None:
        out["onnx"] = onnx_flops(onnx_path)
    counted = [c["flops_per_image"] for c in (out["torch"], out["onnx"]) if c]
    out["flops_per_image"] = counted[0] if counted else None
    out["gflops_per_image"] = counted[0] / 1e9 if counted else None
    if len(counted) == 2:
        out["relative_difference"] = abs(counted[0] - counted[1]) / max(counted)
        out["agree"] = out["relative_difference"] < 0.01
    return out
