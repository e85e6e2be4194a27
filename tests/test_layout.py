"""core.layout: one naming of models and one place for every artifact directory."""
import os

from ner_compress.core import layout
from ner_compress.core.layout import ModelRef


def touch_manifest(directory):
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, "manifest.json"), "w").close()


def test_names_and_directories_of_every_kind_of_model(tmp_path):
    refs = [ModelRef(), ModelRef("teacher", 0.5), ModelRef("student"), ModelRef("student", 0.8333)]
    assert [r.name for r in refs] == ["teacher", "width 0.5", "student", "student width 0.8333"]
    assert [os.path.relpath(layout.export_dir(str(tmp_path), r), tmp_path) for r in refs] == [
        "export/teacher", "export/width_0.5", "export/student", "export/student_width_0.8333"]
    assert [r.width_mult for r in refs] == [1.0, 0.5, 1.0, 0.8333]


def test_a_width_given_with_more_decimals_names_the_directory_the_supernet_wrote(tmp_path):
    out = str(tmp_path)
    touch_manifest(layout.width_dir(layout.ofa_dir(out), 0.8333))
    ref = ModelRef("teacher", 0.83333)
    assert ref == ModelRef("teacher", 0.8333) and ref.name == "width 0.8333"
    assert layout.require_trained_width(layout.ofa_dir(out), 0.83333) == layout.width_dir(layout.ofa_dir(out), 0.8333)
    os.makedirs(os.path.join(layout.export_dir(out, ref), "static"))
    touch_manifest(layout.stage_dir(out, "teacher"))
    assert ModelRef("teacher", 0.8333) in layout.exported_models(out)


def test_planned_models_in_table_order():
    assert [r.name for r in layout.planned_models([0.5, 1.0], with_student=True)] == [
        "teacher", "width 1.0", "width 0.5", "student", "student width 1.0", "student width 0.5"]
    assert [r.name for r in layout.planned_models([0.5], with_student=False)] == ["teacher", "width 0.5"]


def test_only_finished_stages_count_as_trained_and_only_exports_with_a_static_graph_as_exported(tmp_path):
    out = str(tmp_path)
    touch_manifest(layout.stage_dir(out, "teacher"))
    for width in (0.5, 1.0):
        touch_manifest(layout.width_dir(layout.ofa_dir(out), width))
    os.makedirs(layout.width_dir(layout.ofa_dir(out), 0.6667))  # interrupted: no manifest yet
    touch_manifest(layout.width_dir(layout.ofa_dir(out, "student"), 0.5))  # its student/ is not finished
    assert layout.trained_widths(layout.ofa_dir(out)) == [1.0, 0.5]
    assert [r.name for r in layout.trained_models(out)] == ["teacher", "width 1.0", "width 0.5", "student width 0.5"]
    for ref in (ModelRef("teacher", 0.5), ModelRef()):
        os.makedirs(os.path.join(layout.export_dir(out, ref), "static"))
    os.makedirs(layout.export_dir(out, ModelRef("teacher", 1.0)))  # no static/: not exported
    assert [r.name for r in layout.exported_models(out)] == ["teacher", "width 0.5"]


def test_the_benchmark_measures_the_models_named_and_refuses_an_unknown_name(tmp_path):
    import pytest

    from ner_compress.commands.stages import chosen_models
    from ner_compress.core.errors import UserError

    out = str(tmp_path)
    touch_manifest(layout.stage_dir(out, "teacher"))
    touch_manifest(layout.width_dir(layout.ofa_dir(out), 0.5))
    for ref in (ModelRef(), ModelRef("teacher", 0.5)):
        os.makedirs(os.path.join(layout.export_dir(out, ref), "static"))
    assert [r.name for r in chosen_models(out)] == ["teacher", "width 0.5"]
    assert [r.name for r in chosen_models(out, ["width 0.5"])] == ["width 0.5"]
    with pytest.raises(UserError, match=r"--models 'student': not exported under .*; exported: 'teacher', 'width 0.5'"):
        chosen_models(out, ["student", "teacher"])
