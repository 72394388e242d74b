"""ONNX -> MindSpore: `nn.Cell` classes with a straight-line `construct`, exported to MINDIR with
dynamic dims and run as `nn.GraphCell`."""
