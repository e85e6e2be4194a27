"""How an option is declared (``flag_field``: its default and its flag's help) and how long a training stage
trains (``Schedule``, added to a stage's option group as prefixed flags by ``with_schedule``)."""
import dataclasses
from dataclasses import dataclass, fields

from ner_compress.core.errors import UserError


def flag_field(default, help_text, **argparse_extra):
    """A field of an options dataclass: its default and the help (and choices) of its flag."""
    metadata = {"help": help_text, **argparse_extra}
    if isinstance(default, list):  # dataclasses refuse a mutable default: each instance gets a copy
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class Schedule:
    """How long and how fast one training stage trains. Each training stage's option group has its own copy
    as prefixed flags (``with_schedule``: ``--ofa_max_steps``); ``schedule_of`` reads it back."""
    learning_rate: float = flag_field(2e-5, "{who}: peak learning rate")
    num_train_epochs: float = flag_field(3.0, "{who}: epochs (when --{prefix}max_steps is not set)")
    max_steps: int = flag_field(-1, "{who}: steps (> 0 overrides --{prefix}num_train_epochs)")
    eval_steps: int = flag_field(500, "{who}: score dev every N steps{also}")


SCHEDULE_PREFIXES = {}  # training stage -> the prefix of its schedule's flags


def with_schedule(stage, prefix, who, also="", **defaults):
    """Class decorator: the option group plus one field per ``Schedule`` field, named ``prefix + name``,
    its default from ``defaults`` (else the schedule's), its help about ``who``."""
    def add(group):
        SCHEDULE_PREFIXES[stage] = prefix
        extra = [(prefix + f.name, f.type, flag_field(defaults.get(f.name, f.default),
                                                     f.metadata["help"].format(who=who, prefix=prefix, also=also)))
                 for f in fields(Schedule)]
        return dataclasses.make_dataclass(group.__name__, extra, bases=(group,),
                                          namespace={"__doc__": group.__doc__, "__module__": group.__module__})
    return add


def schedule_of(options, stage):
    """The ``Schedule`` of a training stage (teacher, ofa, student, search), read from the prefixed fields
    ``with_schedule`` gave ``options``."""
    prefix = SCHEDULE_PREFIXES[stage]
    return Schedule(**{f.name: getattr(options, prefix + f.name) for f in fields(Schedule)})


def check_schedules(options):
    """Refuse, in one line, an evaluation interval below 1 in any stage schedule ``options`` carries."""
    for prefix in SCHEDULE_PREFIXES.values():
        value = getattr(options, f"{prefix}eval_steps", 1)  # Config has the stages' schedules, a tool its own
        if value < 1:
            raise UserError(f"--{prefix}eval_steps {value}: must be at least 1")
