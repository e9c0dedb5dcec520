"""Inference runtimes: one module per backend, each registering itself.

:mod:`nasforge.runtimes.base` defines the :class:`~nasforge.runtimes.base.Runtime` interface
(file layout in an export bundle, export, sessions, timing export, parity, targets, Triton);
:mod:`nasforge.runtimes.registry` finds the backends (every other module of this package) and
looks them up by name. Built in: ``onnxruntime`` (CPU and CUDA execution providers; the base
ONNX graphs every bundle has), ``openvino`` (IR converted from the ONNX graphs, FP32 pinned),
``tensorrt`` (ONNX Runtime's TensorRT execution provider on the ONNX graphs) and ``executorch``
(``.pte`` programs lowered to the XNNPACK delegate; INT8 from its own pt2e quantizer).

Adding a runtime is one module here::

    @register_runtime
    class MyRuntime(Runtime):
        name = "myrt"
        suffixes = (".my",)
        targets = (("myrt-cpu", "cpu", "fp32"),)
        ...  # availability_problem, layout, export, open_session, runner
"""
