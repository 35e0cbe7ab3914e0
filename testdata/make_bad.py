"""Build testdata/bad/: malformed ONNX models the error-handling tests feed to kiln.

Run by hand when they change: python3 testdata/make_bad.py
"""
import os
from onnx import TensorProto, helper

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad")
os.makedirs(here, exist_ok=True)
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])


def save(name, nodes, extra_opsets=()):
    g = helper.make_graph(nodes, name, [x], [y])
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 8
    with open(os.path.join(here, name + ".onnx"), "wb") as f:
        f.write(m.SerializeToString())  # no checker: these are invalid on purpose


# a -> b -> a: a cycle.
save("cyclic", [
    helper.make_node("Add", ["x", "b"], ["a"], name="add_a"),
    helper.make_node("Relu", ["a"], ["b"], name="relu_b"),
    helper.make_node("Identity", ["b"], ["y"], name="out"),
])
# Reads a name nothing produces.
save("missing_input", [helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")])
# An op kiln does not know.
save("unsupported_op", [helper.make_node("FrobnicateTensor", ["x"], ["y"], name="frob", domain="com.example")],
     extra_opsets=[("com.example", 1)])
