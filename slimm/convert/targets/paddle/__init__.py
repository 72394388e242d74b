"""ONNX -> PaddlePaddle: a `paddle.nn.Layer` per part saved with `paddle.jit.save` (Paddle 3's PIR
program, `<name>.json` + `<name>.pdiparams`) and run by Paddle Inference's predictor."""
