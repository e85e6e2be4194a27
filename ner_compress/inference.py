"""Paddle Inference on the exported static graph: text in, entities out.

The static directory is self-contained: ``model.pdmodel``/``model.pdiparams``, the
vocabulary and ``inference.json`` (labels, maximum length). Long texts are cut into
windows of ``max_seq_length - 2`` characters and stitched back, so no character is dropped.
"""
import json
import os

import numpy as np
import paddle.inference as paddle_infer

from .data import CharEncoder, Sentence, collate, encode, eval_batches, load_vocab, stitch
from .errors import UserError
from .metrics import extract_entities

MODEL_PREFIX = "model"
INFERENCE_META = "inference.json"


def read_meta(model_dir):
    path = os.path.join(model_dir, INFERENCE_META)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(model_dir, MODEL_PREFIX + ".pdmodel")):
        raise UserError(f"{model_dir}: not an exported static model (no {INFERENCE_META} or "
                        f"{MODEL_PREFIX}.pdmodel); run `python tools/export.py` first")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def predictor_config(model_dir, device="cpu", threads=None, mkldnn=True):
    config = paddle_infer.Config(os.path.join(model_dir, MODEL_PREFIX + ".pdmodel"),
                                 os.path.join(model_dir, MODEL_PREFIX + ".pdiparams"))
    if device == "gpu":
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
        if mkldnn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(16)  # shapes vary per batch; bound oneDNN's cache
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return config


def predict_windows(logits_fn, windows, batch_size, pad_id=0):
    """Argmax label ids per window, in the windows' order; ``logits_fn(input_ids, token_type_ids)``
    takes and returns numpy arrays (a predictor, ONNX Runtime, or ``modeling.numpy_logits``)."""
    preds = [None] * len(windows)
    for idx in eval_batches(windows, batch_size):
        batch = collate([windows[i] for i in idx], pad_id)
        out = np.asarray(logits_fn(batch["input_ids"], batch["token_type_ids"])).argmax(-1)
        for row, i in enumerate(idx):
            preds[i] = out[row]
    return preds


class Tagger:
    """Text -> entities around one ``logits(input_ids, token_type_ids)``; backends subclass it."""

    def __init__(self, model_dir, batch_size=32):
        self.meta = read_meta(model_dir)
        self.labels = self.meta["labels"]
        self.max_seq_length = int(self.meta["max_seq_length"])
        self.encoder = CharEncoder(load_vocab(os.path.join(model_dir, "vocab.txt")))
        self.batch_size = batch_size

    def logits(self, input_ids, token_type_ids):
        raise NotImplementedError

    def windows(self, sentences):
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        return encode(sentences, self.encoder, label_to_id, self.max_seq_length)

    def tag_sentences(self, sentences):
        """Predicted BIO tags per sentence (``Sentence.tags`` may be empty)."""
        windows = self.windows(sentences)
        preds = predict_windows(self.logits, windows, self.batch_size, self.encoder.pad_id)
        return stitch(sentences, windows, preds, self.labels)

    def predict(self, texts):
        """``[{text, entities}]`` for each text; empty texts give no entities."""
        results = [{"text": t, "entities": []} for t in texts]
        live = [i for i, t in enumerate(texts) if t]
        tags = self.tag_sentences([Sentence(list(texts[i]), []) for i in live])
        for i, sentence_tags in zip(live, tags):
            results[i]["entities"] = extract_entities(texts[i], sentence_tags)
        return results


class StaticTagger(Tagger):
    """Tags texts with an exported static model through Paddle Inference."""

    def __init__(self, model_dir, device="cpu", threads=None, mkldnn=True, batch_size=32, int8=False):
        super().__init__(model_dir, batch_size)
        config = predictor_config(model_dir, device, threads, mkldnn)
        if int8 and device == "cpu":
            # INT8 kernels for the linear layers only: letting oneDNN also quantize the attention
            # matmuls (fused_matmul) dropped test F1 from 0.30 to 0.10 on the demo model, while
            # fake-quant simulation of the same calibration kept 0.298 (measured, Paddle 2.6.2)
            config.enable_mkldnn_int8({"fc"})
        self.predictor = paddle_infer.create_predictor(config)
        self.input_names = self.predictor.get_input_names()

    def logits(self, input_ids, token_type_ids):
        feeds = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        for name in self.input_names:
            handle = self.predictor.get_input_handle(name)
            handle.reshape(feeds[name].shape)
            handle.copy_from_cpu(np.ascontiguousarray(feeds[name]))
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()
