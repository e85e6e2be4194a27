"""The compression stages, in pipeline order: vocabulary pruning, teacher fine-tuning, the OFA width supernet
(importance reorder, distillation at every width), the shallower student (intermediate matches as data); one
training loop they share. Stands on ``core``, ``data`` and ``models``."""
