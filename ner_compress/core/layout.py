"""Where every artifact lives under ``--output_dir``, and what each model is called: the one place that knows.

    output_dir/
      pruned_model/                  the pretrained model, vocabulary cut to the corpus (``prune_vocab``)
      teacher/  student/             fine-tuned teacher, distilled student (best dev F1; manifest.json)
      ofa/width_W/                   the teacher's width supernet, best per width
      student_ofa/width_W/           the student's
      search/<name>/                 a model searched for a latency budget (per-layer widths); latency/ tables
      export/<model>/                dynamic/, static/, onnx/ of one model (``ModelRef.dir_name``)
      checkpoints/<stage>/           resumable training state
      report/                        the benchmark's results.json, report.md, pareto.png

A model is a ``ModelRef``: what it was made of (the teacher or the student) and the width cut from that
source's supernet (``None``: the source itself). Tables, the benchmark, the load test and every stage take
names and directories from it; nothing else builds or parses them.
"""
import os
from dataclasses import dataclass
from typing import Optional

from ner_compress.core.artifacts import MAKERS, MANIFEST
from ner_compress.core.errors import UserError

SOURCES = ("teacher", "student")  # what a width supernet can be made of (``--from``)
WIDTH_PREFIX = "width_"  # ofa/width_0.5/
SEARCH_DIR = "search"  # search/<name>/: models searched for a latency budget (per-layer widths)



def width_key(width):
    """The one rounding rule for a width in names and directories: 4 decimals (0.83333 -> 0.8333)."""
    return round(float(width), 4)


@dataclass(frozen=True)
class ModelRef:
    source: str = "teacher"
    width: Optional[float] = None
    label: Optional[str] = None  # a searched model's name (``source`` "search")

    def __post_init__(self):
        if self.width is not None:  # so --width_mult 0.83333 names the same model and directory as 0.8333
            object.__setattr__(self, "width", width_key(self.width))

    @property
    def name(self):
        """The table name: teacher, width 0.5, student, student width 0.5."""
        if self.label is not None:
            return f"{self.source} {self.label}"
        if self.width is None:
            return self.source
        return f"width {self.width}" if self.source == "teacher" else f"{self.source} width {self.width}"

    @property
    def dir_name(self):
        return self.name.replace(" ", "_")

    @property
    def width_mult(self):
        return 1.0 if self.width is None else self.width


def stage_dir(output_dir, source):
    """The trained teacher or student (``teacher/``, ``student/``)."""
    return os.path.join(output_dir, source)


def ofa_dir(output_dir, source="teacher"):
    return os.path.join(output_dir, "ofa" if source == "teacher" else f"{source}_ofa")


def width_dir(supernet_dir, width):
    return os.path.join(supernet_dir, f"{WIDTH_PREFIX}{width_key(width)}")


def trained_dir(output_dir, ref):
    """Where a trained model lives, and the stage that wrote it: ``teacher/``, ``student/``, or a width of a
    supernet (``ofa/width_W``, stage ``ofa``)."""
    if ref.label is not None:
        return os.path.join(output_dir, SEARCH_DIR, ref.label), SEARCH_DIR
    if ref.width is None:
        return stage_dir(output_dir, ref.source), ref.source
    return width_dir(ofa_dir(output_dir, ref.source), ref.width), "ofa"


def export_dir(output_dir, ref):
    return os.path.join(output_dir, "export", ref.dir_name)


def checkpoint_dir(output_dir, stage):
    return os.path.join(output_dir, "checkpoints", stage)


def report_dir(output_dir):
    return os.path.join(output_dir, "report")


def trained_widths(supernet_dir):
    """Widths W with a finished ``supernet_dir/width_W/manifest.json``, widest first."""
    if not os.path.isdir(supernet_dir):
        return []
    return sorted((float(name[len(WIDTH_PREFIX):]) for name in os.listdir(supernet_dir)
                   if name.startswith(WIDTH_PREFIX) and os.path.isfile(os.path.join(supernet_dir, name, MANIFEST))),
                  reverse=True)


def require_trained_width(supernet_dir, width):
    """``supernet_dir/width_W``, or a one-line error naming the widths that were trained."""
    available = trained_widths(supernet_dir)
    if not available:
        raise UserError(f"{supernet_dir}: no trained width here; run `{MAKERS['ofa']}` first")
    if width_key(width) not in [width_key(w) for w in available]:
        raise UserError(f"--width_mult {width}: not trained in {supernet_dir} (trained: {sorted(available)}); "
                        f"run `{MAKERS['ofa']} --width_mult_list ... {width}`")
    return width_dir(supernet_dir, width)


def planned_models(widths, with_student):
    """Every model a run makes, in table order: the teacher, its widths (widest first), then the same for
    the student."""
    sources = SOURCES if with_student else SOURCES[:1]
    return [ModelRef(source, width) for source in sources for width in [None, *sorted(widths, reverse=True)]]


def trained_models(output_dir):
    """Every model the stages under ``output_dir`` have finished (so it can be exported), in table order."""
    found = []
    for source in SOURCES:
        if os.path.isfile(os.path.join(stage_dir(output_dir, source), MANIFEST)):
            found.append(ModelRef(source))
        found += [ModelRef(source, w) for w in trained_widths(ofa_dir(output_dir, source))]
    return found + searched_models(output_dir)


def searched_models(output_dir):
    """The finished ``search/<name>`` models, by name."""
    directory = os.path.join(output_dir, SEARCH_DIR)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    return [ModelRef(SEARCH_DIR, label=name) for name in names
            if os.path.isfile(os.path.join(directory, name, MANIFEST))]


def is_exported(output_dir, ref):
    return os.path.isdir(os.path.join(export_dir(output_dir, ref), "static"))


def exported_models(output_dir):
    """The finished models under ``output_dir`` that have an ``export/<model>/static/``, in table order."""
    return [ref for ref in trained_models(output_dir) if is_exported(output_dir, ref)]
