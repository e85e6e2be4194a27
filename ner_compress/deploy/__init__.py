"""Deployment: export a trained model at one width (dynamic model, static graph, ONNX with fused attention and
INT8 copies, each parity-checked) and the taggers that run them (Paddle dynamic, Paddle Inference, ONNX
Runtime). Stands on the layers below; the ONNX Runtime tagger loads neither PaddleNLP nor PaddleSlim."""
