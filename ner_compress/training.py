"""Teacher fine-tuning: AdamW with linear warm-up and decay, dev F1 every N steps, best kept."""
import logging
import math
import random

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import BertTokenizer, LinearDecayWithWarmup
from tqdm import tqdm

from .artifacts import atomic_dir, write_manifest
from .data import IGNORE_INDEX, collate, eval_batches, stitch, train_batches
from .errors import UserError
from .metrics import entity_scores
from .modeling import build_teacher, count_parameters

log = logging.getLogger("ner_compress")


def setup_logging(level=logging.INFO):
    """Our progress lines on stderr; PaddleNLP's per-file save notices only at WARNING."""
    from paddlenlp.utils.log import logger as paddlenlp_logger

    paddlenlp_logger.set_level("WARNING")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def set_device(device):
    if device == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise UserError("--device gpu: this paddlepaddle has no CUDA; install paddlepaddle-gpu==2.6.2 or use cpu")
    paddle.set_device("gpu" if device == "gpu" else "cpu")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def to_tensors(batch):
    return {k: paddle.to_tensor(v) for k, v in batch.items()}


def token_loss(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def make_optimizer(parameters, named_parameters, learning_rate, weight_decay, warmup_ratio, total_steps):
    """AdamW with linear warm-up then linear decay; no weight decay on biases and norms."""
    scheduler = LinearDecayWithWarmup(learning_rate, total_steps, warmup_ratio)
    decay = {p.name for n, p in named_parameters if not any(k in n for k in ("bias", "norm"))}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler, parameters=parameters, weight_decay=weight_decay,
        apply_decay_param_fun=lambda name: name in decay, grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    return optimizer, scheduler


def total_steps(max_steps, epochs, steps_per_epoch):
    if steps_per_epoch == 0:
        raise UserError("no training batches: the training split is empty or smaller than one batch")
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))


def count_batches(windows, batch_size):
    return len(train_batches([len(w.input_ids) for w in windows], batch_size, 0, 0))


def iterate_steps(windows, batch_size, seed, steps, rank=0, world_size=1):
    """Yield (epoch, collated batch) for exactly ``steps`` steps, reshuffling every epoch."""
    lengths = [len(w.input_ids) for w in windows]
    done, epoch = 0, 0
    while done < steps:
        for idx in train_batches(lengths, batch_size, seed, epoch, rank, world_size):
            if done == steps:
                return
            yield epoch, collate([windows[i] for i in idx], pad_id=0)
            done += 1
        epoch += 1


def predict_windows(logits_fn, windows, batch_size, pad_id=0):
    """Argmax label ids per window, in the windows' order."""
    preds = [None] * len(windows)
    with paddle.no_grad():
        for idx in eval_batches(windows, batch_size):
            batch = collate([windows[i] for i in idx], pad_id)
            logits = logits_fn({k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels"})
            for row, i in enumerate(idx):
                preds[i] = logits[row].argmax(-1).numpy()
    return preds


def evaluate(logits_fn, sentences, windows, labels, batch_size):
    preds = predict_windows(logits_fn, windows, batch_size)
    pred_tags = stitch(sentences, windows, preds, labels)
    return entity_scores([s.tags for s in sentences], pred_tags)


def model_logits(model):
    def fn(inputs):
        return model(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
    return fn


def save_teacher(model, data, cfg, metrics, out_dir):
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        BertTokenizer(data.vocab_file).save_pretrained(tmp)
        write_manifest(tmp, "teacher", cfg.to_dict(), data.labels, data.vocab_sha256, metrics,
                       data_sources=data.splits.sources, parameters=count_parameters(model))


def train_teacher(cfg, data, out_dir):
    """Fine-tune the teacher; the best dev-F1 model is (re)written to ``out_dir`` as it appears."""
    set_seed(cfg.seed)
    model = build_teacher(cfg, data.labels, len(data.encoder.vocab))
    train_w, dev_w = data.windows("train"), data.windows("dev")
    steps_per_epoch = count_batches(train_w, cfg.per_device_train_batch_size)
    steps = total_steps(cfg.max_steps, cfg.num_train_epochs, steps_per_epoch)
    optimizer, scheduler = make_optimizer(model.parameters(), model.named_parameters(), cfg.learning_rate,
                                          cfg.weight_decay, cfg.warmup_ratio, steps)
    log.info("teacher: %d parameters, %d train windows, %d steps (%.2f epochs)", count_parameters(model),
             len(train_w), steps, steps / steps_per_epoch)
    best = {"dev_f1": -1.0}
    bar = tqdm(total=steps, desc="teacher", mininterval=2, dynamic_ncols=True)
    model.train()
    for step, (epoch, batch) in enumerate(iterate_steps(train_w, cfg.per_device_train_batch_size, cfg.seed,
                                                        steps), 1):
        batch = to_tensors(batch)
        loss = token_loss(model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]),
                          batch["labels"])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.clear_grad()
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}", best_f1=f"{max(best['dev_f1'], 0):.4f}")
        if step % cfg.logging_steps == 0:
            log.info("teacher step %d/%d epoch %d loss %.4f lr %.2e", step, steps, epoch, float(loss),
                     optimizer.get_lr())
        if step % cfg.eval_steps == 0 or step == steps:
            model.eval()
            scores = evaluate(model_logits(model), data.splits.dev, dev_w, data.labels, cfg.per_device_eval_batch_size)
            model.train()
            log.info("teacher step %d dev P %.4f R %.4f F1 %.4f", step, scores["precision"], scores["recall"],
                     scores["f1"])
            if scores["f1"] > best["dev_f1"]:
                best = {"dev_f1": scores["f1"], "dev": scores, "step": step}
                save_teacher(model, data, cfg, best, out_dir)
    bar.close()
    log.info("teacher: best dev F1 %.4f at step %d -> %s", best["dev_f1"], best["step"], out_dir)
    return best
