"""The data: the MSRA corpus and its splits, character vocabularies, windows of at most ``max_seq_length``
characters and their batches, BIO-constrained decoding and entity scores. Stands on ``core`` only."""
