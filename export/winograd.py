"""Winograd convolution for the CPU target: every 3x3, stride-1 convolution of a float32 graph
rewritten as F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) in plain ONNX operators, so ONNX Runtime's CPU kernels run it.

A 3x3 convolution over an (m+2) x (m+2) input tile gives an m x m output tile with
(m+2)^2 multiplications per input/output channel pair instead of 9 m^2: 2.25x fewer for
F(2x2, 3x3), 4x fewer for F(4x4, 3x3). For each convolution (input X [N, C, H, W], weight
[K, C, 3, 3], padding 1)::

    V  = Conv(X, B)          grouped (one group per channel), kernel (m+2)^2, stride m:
                             the input transform B^T d B of every tile  -> [N, C*a^2, th, tw]
    V' = [N, a^2, C, T]      (Reshape, Transpose of two axes; T = th*tw tiles)
    M  = U @ V'              U = G g G^T per channel pair, [a^2, K, C], computed at build time:
                             a^2 batched GEMMs, where nearly all the work is  -> [N, a^2, K, T]
    Y  = A2 @ M              the output transform A^T M A, [m^2, a^2]          -> [N, m^2, K, T]
    Y  = DepthToSpace(Y, m)  tiles back into the image, cropped to H x W, + bias

(``a = m + 2``). Inputs whose height or width is not a multiple of m are padded with zeros
by the grouped convolution and the extra rows are cropped, so any shape in the profile works.
Measured on a 2-core AMD EPYC (ONNX Runtime 1.32, one layer; benchmarks/ort_winograd.py):
F(4, 3) 1.73x the direct convolution for 320 channels at 32x32 (batch 2), 1.77x for 640 at
16x16, 2.31x for 512 at 64x64 (batch 1); F(2, 3) 1.57x for 1280 at 8x8 but 0.63x at 4x4,
where its GEMMs read more weights than they compute with (hence ``MIN_SIZE``). The cost is
memory: the transformed weights hold a^2/9 times the original (4x for F(4, 3), 1.8x for
F(2, 3)), so the wide convolutions (more than ``WIDE`` output channels: SD 1.5's 1280, most
of its weights) use F(2, 3). Rounding: F(2, 3) ~4e-7, F(4, 3) ~1e-5 of the output's
magnitude in float32 (the transforms are exact in float64, applied in float32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TILES = (2, 4)
# Where the rewrite pays, measured on the 2-core CPU: not below 8x8 pixels (at 4x4, SD 1.5's
# 1280-channel convolutions ran 1.6x slower) and not below 32 channels. The build applies it
# where the profile's smallest request meets both.
MIN_SIZE = 8
MIN_CHANNELS = 32
WIDE = 640          # F(4, 3) up to this many output channels, F(2, 3) above
KEPT = "kept: too small"    # the count of eligible convolutions left direct (see MIN_SIZE)


def describe() -> str:
    """The rewrite's settings, as recorded in an artifact's key."""
    return f"winograd(F(4,3) to {WIDE} out ch, F(2,3) above, from {MIN_SIZE}x{MIN_SIZE} px, {MIN_CHANNELS} ch)"


def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B^T [a, a], G [a, 3], A^T [m, a] of F(m, 3) (Lavin & Gray's points 0, +-1, +-2, inf)."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"F({m}, 3) is not implemented; tile sizes: {', '.join(map(str, TILES))}")
    return np.array(bt, np.float64), np.array(g, np.float64), np.array(at, np.float64)


def transformed_weight(weight: np.ndarray, m: int) -> np.ndarray:
    """U[i*a + j, k, c] = (G w[k, c] G^T)[i, j], float32 (computed in float64)."""
    _, g, _ = winograd_matrices(m)
    k, c = weight.shape[:2]
    u = g @ weight.astype(np.float64) @ g.T                 # [K, C, a, a]
    return np.ascontiguousarray(u.transpose(2, 3, 0, 1).reshape((m + 2) ** 2, k, c).astype(np.float32))


def input_transform_kernel(channels: int, m: int) -> np.ndarray:
    """The grouped convolution's weight [C*a^2, 1, a, a]: B^T d B for each of the a^2 outputs."""
    bt, _, _ = winograd_matrices(m)
    a = m + 2
    one = np.einsum("ip,jq->ijpq", bt, bt).reshape(a * a, 1, a, a)
    return np.ascontiguousarray(np.tile(one, (channels, 1, 1, 1)).astype(np.float32))


def output_transform(m: int) -> np.ndarray:
    """[m^2, a^2]: row (i*m + j) maps a transformed tile to output pixel (i, j) (A^T M A)."""
    _, _, at = winograd_matrices(m)
    return np.ascontiguousarray(np.einsum("ip,jq->ijpq", at, at).reshape(m * m, (m + 2) ** 2).astype(np.float32))


def default_tile(channels_in: int, channels_out: int) -> int:
    """F(4, 3) up to ``WIDE`` output channels, F(2, 3) above (weights: 4x against 1.8x the
    original). Measured (benchmarks/ort_winograd.py): F(4, 3) wins where the output is narrow
    and the image large (960->320 at 32x32: 2.3x against 1.45x), F(2, 3) on SD 1.5's 1280-wide
    convolutions at 8x8 (1.6-1.8x against 0.7-0.8x), where the GEMMs read more weights than
    they compute with."""
    return 4 if channels_out <= WIDE else 2


def _attributes(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _eligible(node, initializers: dict, min_channels: int):
    """The weight initializer when ``node`` is a 3x3, stride-1, padding-1, ungrouped float32
    convolution with a constant weight of at least ``min_channels`` channels each way."""
    from onnx import TensorProto
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    w = initializers.get(node.input[1])
    if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 4 or tuple(w.dims[2:]) != (3, 3):
        return None
    attrs = _attributes(node)
    if (attrs.get("group", 1) != 1 or list(attrs.get("strides", [1, 1])) != [1, 1]
            or list(attrs.get("dilations", [1, 1])) != [1, 1] or list(attrs.get("pads", [0] * 4)) != [1, 1, 1, 1]
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    if min(w.dims[0], w.dims[1]) < min_channels:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
        return None
    return w


def rewrite_convolutions(model, sizes: dict[str, tuple[int, int]] | None = None, min_size: int | None = None,
                         min_channels: int | None = None, tile=default_tile) -> dict[str, int]:
    """Rewrite ``model``'s eligible convolutions (see ``_eligible``) in place as Winograd
    subgraphs; ``tile(C, K)`` picks m. With ``sizes`` (node name -> input height, width, e.g.
    from ``probe_conv_sizes`` at the profile's smallest request), only the convolutions whose
    input is at least ``min_size`` each way. Returns how many were rewritten per tile size, e.g.
    ``{"F(4,3)": 17, "F(2,3)": 17}``, and how many eligible ones were left as they were because
    they run too small (``KEPT``); everything else is untouched."""
    from onnx import NodeProto, helper, numpy_helper

    min_size = MIN_SIZE if min_size is None else min_size
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    shared: set[str] = set()
    new_nodes, new_inits, counts = [], [], {}

    def const(name: str, array: np.ndarray) -> str:
        if name not in shared:
            shared.add(name)
            new_inits.append(numpy_helper.from_array(array, name))
        return name

    for index, node in enumerate(graph.node):
        weight = _eligible(node, initializers, min_channels)
        if weight is None:
            new_nodes.append(node)
            continue
        if sizes is not None and min(sizes.get(node.name, (0, 0))) < min_size:
            new_nodes.append(node)
            counts[KEPT] = counts.get(KEPT, 0) + 1
            continue
        w = numpy_helper.to_array(weight)
        k, c = int(w.shape[0]), int(w.shape[1])
        m = int(tile(c, k))
        a2 = (m + 2) ** 2
        p = f"{node.name or 'conv'}_{index}_winograd{m}"
        u = const(f"{p}_U", transformed_weight(w, m))
        kin = const(f"winograd{m}_input_transform_{c}", input_transform_kernel(c, m))
        out_t = const(f"winograd{m}_output_transform", output_transform(m))
        s_tiles = const(f"winograd{m}_shape_tiles_{c}", np.array([0, c, a2, -1], np.int64))
        s_flat = const(f"winograd{m}_shape_flat", np.array([0, a2, -1], np.int64))
        s_depth = const(f"winograd{m}_shape_depth_{k}", np.array([0, m * m * k], np.int64))
        axes = const("winograd_spatial_axes", np.array([2, 3], np.int64))
        zeros = const("winograd_spatial_zeros", np.array([0, 0], np.int64))
        x, y = node.input[0], node.output[0]
        cropped = f"{p}_cropped" if len(node.input) > 2 and node.input[2] else y
        new_nodes += [
            # padding 1 before, m after: ceil(H/m) tiles whatever H is; extra rows cropped below
            helper.make_node("Conv", [x, kin], [f"{p}_v"], name=f"{p}_input", group=c, kernel_shape=[m + 2, m + 2],
                             strides=[m, m], pads=[1, 1, m, m]),
            helper.make_node("Reshape", [f"{p}_v", s_tiles], [f"{p}_v1"], name=f"{p}_tiles"),
            helper.make_node("Transpose", [f"{p}_v1"], [f"{p}_v2"], name=f"{p}_channels_inner", perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [u, f"{p}_v2"], [f"{p}_m"], name=f"{p}_gemm"),
            helper.make_node("Reshape", [f"{p}_m", s_flat], [f"{p}_m1"], name=f"{p}_flat"),
            helper.make_node("MatMul", [out_t, f"{p}_m1"], [f"{p}_o"], name=f"{p}_output"),
            helper.make_node("Shape", [f"{p}_v"], [f"{p}_grid"], name=f"{p}_grid", start=2),
            helper.make_node("Concat", [s_depth, f"{p}_grid"], [f"{p}_s"], name=f"{p}_depth_shape", axis=0),
            helper.make_node("Reshape", [f"{p}_o", f"{p}_s"], [f"{p}_o1"], name=f"{p}_depth"),
            helper.make_node("DepthToSpace", [f"{p}_o1"], [f"{p}_o2"], name=f"{p}_untile", blocksize=m, mode="DCR"),
            helper.make_node("Shape", [x], [f"{p}_hw"], name=f"{p}_hw", start=2, end=4),
            helper.make_node("Slice", [f"{p}_o2", zeros, f"{p}_hw", axes], [cropped], name=f"{p}_crop"),
        ]
        if cropped != y:
            bias = numpy_helper.to_array(initializers[node.input[2]]).reshape(1, k, 1, 1)
            b = const(f"{p}_bias", np.ascontiguousarray(bias.astype(np.float32)))
            new_nodes.append(helper.make_node("Add", [cropped, b], [y], name=f"{p}_bias"))
        counts[f"F({m},3)"] = counts.get(f"F({m},3)", 0) + 1
    if set(counts) <= {KEPT}:
        return counts
    nodes = []
    for n in new_nodes:                 # copies: the originals go with the old list
        nodes.append(NodeProto())
        nodes[-1].CopyFrom(n)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for i in reversed(range(len(graph.initializer))):   # the replaced weights (no copy of the rest)
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
    graph.initializer.extend(new_inits)
    return counts


def probe_conv_sizes(path, feeds: dict) -> dict[str, tuple[int, int]]:
    """Each convolution's input height and width when the graph at ``path`` runs ``feeds``
    (one unoptimised ONNX Runtime run with profiling, so node names stay the graph's own)."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "probe")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    sizes = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and args.get("op_name") == "Conv" and e["name"].endswith("_kernel_time"):
            shape = next(iter(args["input_type_shape"][0].values()))
            sizes[e["name"][: -len("_kernel_time")]] = (int(shape[2]), int(shape[3]))
    return sizes


def rewrite_file(path, feeds: dict | None) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place (its external data too); with ``feeds``, only the
    convolutions that run at least ``MIN_SIZE`` wide on them (the profile's smallest request).
    Returns the counts of ``rewrite_convolutions``; the file is left alone when nothing is
    eligible."""
    import onnx

    from .onnx_export import save_onnx

    model = onnx.load(str(path), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    if not any(_eligible(n, initializers, MIN_CHANNELS) is not None for n in model.graph.node):
        return {}
    sizes = probe_conv_sizes(path, feeds) if feeds is not None else None
    counts = rewrite_convolutions(model, sizes)
    if set(counts) - {KEPT}:
        save_onnx(model, Path(path))
    return counts
