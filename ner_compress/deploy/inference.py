"""Text in, entities out, around any backend's logits (see ``backends``).

The static directory is self-contained: the program and weights (``static_files``), the
vocabulary and ``inference.json`` (labels, maximum length). Long texts are cut into
half-overlapping windows and stitched back, each character from the window where it has the
most context; the whole sentence is then decoded at once (BIO-constrained Viterbi by default).
Batches are padded up to a bucket length (a multiple of ``BUCKET``): the model masks [PAD]
positions, so the real positions' logits do not change, and a backend sees few distinct shapes.
"""
import json
import os

from ner_compress.core.errors import UserError
from ner_compress.core.static_files import PROGRAM_FILES, program_file
from ner_compress.data.corpus import Sentence, encode
from ner_compress.data.vocab import load_encoder
from ner_compress.data.decoding import Decoder
from ner_compress.data.entities import extract_entities
from ner_compress.data.window_scores import BUCKET, model_inputs, tag_sentences

INFERENCE_META = "inference.json"
INPUT_NAMES = ("input_ids", "token_type_ids")  # of every exported graph, static and ONNX


def read_meta(model_dir):
    path = os.path.join(model_dir, INFERENCE_META)
    if not os.path.isfile(path) or program_file(model_dir) is None:
        raise UserError(f"{model_dir}: not an exported static model (no {INFERENCE_META} or "
                        f"{' or '.join(PROGRAM_FILES)}); run `python tools/export.py` first")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class Tagger:
    """Text -> entities around one ``logits(input_ids, token_type_ids)``; backends subclass it."""

    def __init__(self, model_dir, batch_size=32, decoding="viterbi", bucket=True):
        self.meta = read_meta(model_dir)
        self.labels = self.meta["labels"]
        self.max_seq_length = int(self.meta["max_seq_length"])
        self.encoder = load_encoder(os.path.join(model_dir, "vocab.txt"))  # with the directory's lookup rule
        self.batch_size = batch_size
        self.decoder = Decoder(self.labels, decoding)
        self.bucket = BUCKET if bucket else 0

    def logits(self, input_ids, token_type_ids):
        raise NotImplementedError

    def windows(self, sentences):
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        return encode(sentences, self.encoder, label_to_id, self.max_seq_length)

    def tag_sentences(self, sentences):
        """Predicted BIO tags per sentence (``Sentence.tags`` may be empty)."""
        return tag_sentences(self.logits, sentences, self.windows(sentences), self.batch_size, self.encoder.pad_id,
                             self.decoder, self.bucket)

    def batch(self, windows):
        """The model inputs of ``windows`` as this tagger pads them (bucketed)."""
        return model_inputs(windows, self.encoder.pad_id, self.bucket)

    def predict(self, texts):
        """``[{text, entities}]`` for each text; empty texts give no entities."""
        results = [{"text": t, "entities": []} for t in texts]
        live = [i for i, t in enumerate(texts) if t]
        tags = self.tag_sentences([Sentence(list(texts[i]), []) for i in live])
        for i, sentence_tags in zip(live, tags):
            results[i]["entities"] = extract_entities(texts[i], sentence_tags)
        return results
