"""Build testdata/tiny/: a small convolutional classifier that kiln ships as its default model.

Deterministic (seeded) weights; input is an 1x1x28x28 image of a drawn digit-like stroke; the golden
output is onnxruntime's. Run once by hand when the model changes: python3 testdata/make_tiny.py
"""
import os
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
os.makedirs(here, exist_ok=True)
rng = np.random.default_rng(7)


def w(name, *shape, scale=0.2):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


inits = [
    w("conv1_w", 8, 1, 3, 3), w("conv1_b", 8, scale=0.05),
    w("conv2_w", 16, 8, 3, 3, scale=0.1), w("conv2_b", 16, scale=0.05),
    w("fc_w", 16 * 7 * 7, 10, scale=0.05), w("fc_b", 10, scale=0.05),
]
nodes = [
    helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
    helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
    helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
    helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
    helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
    helper.make_node("Shape", ["p2"], ["s"], name="shape"),
    helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0, name="batch_dim"),
    helper.make_node("Unsqueeze", ["batch", "zero_axes"], ["batch1"], name="batch_1d"),
    helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0, name="flat_shape"),
    helper.make_node("Reshape", ["p2", "flat_shape"], ["flat"], name="flatten"),
    helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc"),
    helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_bias"),
    helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
]
inits += [
    numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
    numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_axes"),
    numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
]
graph = helper.make_graph(
    nodes, "tiny_convnet",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
    initializer=inits,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-testdata")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(here, "tiny_convnet.onnx"))

# A stroke drawn like a "7".
img = np.zeros((1, 1, 28, 28), dtype=np.float32)
img[0, 0, 5:8, 6:22] = 1.0
for r in range(8, 24):
    c = 21 - (r - 8) // 2
    img[0, 0, r, c - 1:c + 2] = 1.0
inputs = os.path.join(here, "inputs")
os.makedirs(inputs, exist_ok=True)
np.save(os.path.join(inputs, "input_0.npy"), img)

import onnxruntime as ort
sess = ort.InferenceSession(os.path.join(here, "tiny_convnet.onnx"), providers=["CPUExecutionProvider"])
out = sess.run(None, {"image": img})[0]
np.save(os.path.join(here, "golden_output_0.npy"), out)
print("probs", out)
