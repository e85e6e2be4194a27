"""One exception type for every problem a user can fix, and the CLI wrapper that reports it."""
import sys


class UserError(Exception):
    """Bad input, a missing artifact or a wrong flag: reported as one line, exit code 2."""


class Int8Refused(UserError):
    """An INT8 copy that lost more F1 than allowed: the FP32 export is complete, the INT8 file is not written."""


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
    except Exception as err:
        from ner_compress.core.checkpoint import StopRequested

        if not isinstance(err, StopRequested):
            raise
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
