"""ONNX export, validation, TensorRT engines and runtimes, installed as ``ldm_fast.export``."""
