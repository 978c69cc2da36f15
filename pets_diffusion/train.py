"""Training from the command line: `accelerate launch train_unconditional.py [flags]`, or from the installed package
`accelerate launch -m pets_diffusion.train [flags]`. Parses and checks the flags, runs `train_loop.TrainLoop` under
the output folder's lock, and turns every way a run can end into one line and an exit status."""

import sys

from .interruption import EXIT_INTERRUPTED, ignore_stop_signals
from .options import UsageError, parse_args, validate_args
from .processes import lock_output_dir
from .rollback import EXIT_DIVERGED, RunDiverged, TrainingDiverged
from .runlock import OutputDirBusy
from .storage import DamagedFolder, DiskFull
from .train_loop import Interrupted, TrainLoop


def main(argv: list[str] | None = None, prog: str = "train_unconditional.py") -> None:
    """Bad arguments and damaged checkpoints end in one line and exit status 2; a diverged loss, a full disk or
    another run in --output_dir in one line and 1; a run the divergence guard gave up on in EXIT_DIVERGED (3); a stop
    on SIGTERM or SIGINT, after its checkpoint, in EXIT_INTERRUPTED (75)."""
    args = parse_args(argv, prog)
    try:
        validate_args(args)
        train(args)
    except (UsageError, DamagedFolder) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunDiverged as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None
    except (TrainingDiverged, DiskFull, OutputDirBusy) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Interrupted as stop:
        ignore_stop_signals()  # saved and stopping: more signals must not turn the exit status into a signal's
        print(f"{prog}: {stop}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def train(args) -> dict:
    """Train, checkpoint and save a DDPMPipeline as the arguments say; return the run summary.

    The run holds --output_dir's lock throughout: a second run there is refused at once.
    """
    lock = lock_output_dir(args.output_dir, args.ddp_timeout)
    try:
        loop = TrainLoop(args)
        loop.resume()
        loop.run_loop()
        return loop.finish()
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    main(prog="python -m pets_diffusion.train")
