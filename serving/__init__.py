"""The inference server: a KServe predictor on ONNX Runtime speaking the Open Inference Protocol (v2)."""
