"""A target as the reports carry it (what, the measured figure, met or not) and its one Markdown rendering,
shared by the benchmark's report and the load test's."""


def target(what, measured, met):
    return {"target": what, "measured": measured, "met": bool(met)}


def target_lines(targets):
    """The ``## Targets`` section: one line per target, met or missed."""
    return ["", "## Targets", ""] + [f"- {t['target']}: {t['measured']} — **{'met' if t['met'] else 'missed'}**"
                                     for t in targets]
