"""One exception type for every problem a user can fix, the stop a signal asks for, and the CLI wrapper that
reports both."""
import signal
import sys


class UserError(Exception):
    """Bad input, a missing artifact or a wrong flag: reported as one line, exit code 2."""


class Int8Refused(UserError):
    """An INT8 copy that lost more F1 than allowed: the FP32 export is complete, the INT8 file is not written."""


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was written at ``step``."""

    def __init__(self, signum, step=None, path=None, detail=None):
        detail = detail or f"at step {step}; checkpoint {path}"
        super().__init__(f"stopped by {signal.Signals(signum).name} {detail}; continue with --resume")
        self.signum, self.step, self.path = signum, step, path


def run_cli(main):
    """Run ``main()``; turn a ``UserError`` into ``error: ...`` on stderr and exit 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except StopRequested as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    leave_process_group()


def leave_process_group():
    """After a command that succeeded under ``paddle.distributed.launch``: ``parallel.finish``. Looked up, not
    imported: only the training commands load ``core.parallel`` (and Paddle), the deploy install has neither."""
    parallel = sys.modules.get("ner_compress.core.parallel")
    if parallel is not None:
        parallel.finish()
