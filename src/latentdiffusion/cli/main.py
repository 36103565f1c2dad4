"""`ldm`: parse, check every value, then run one command; the only code that prints."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from tqdm.auto import tqdm

from .. import distributed as dist
from ..api.experiment import check_batches, config_for, shape_of
from ..errors import LdmError
from ..run.rundir import RunDir, run_dir_lock
from .commands import config_command, data_command, dataset_of, dispatch
from .options import (
    check_command,
    check_precisions,
    run_options,
    run_shape,
    train_configs,
)
from .parser import build_parser

log = logging.getLogger(__name__)


class _Lines(logging.Formatter):
    """The library's log records as the CLI's lines: a warning says it is one, as the
    evaluation's checks and Python's own warnings do ("warning: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.getMessage()
        return f"warning: {line}" if record.levelno >= logging.WARNING else line


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores Python's own display for in-process callers
        warnings.showwarning = _show_warning
        return _main(argv)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """A Python warning as one `warning: ...` line: Python's own display adds the file, line
    and source text (`warnings.warn(`), which tell a user nothing."""
    text = " ".join(str(message).split())
    log.warning("%s", text or category.__name__)  # the handler says "warning: "


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for run.json
    except SystemExit as exit_:  # usage errors (2) and --help (0), for in-process callers
        return exit_.code if isinstance(exit_.code, int) else 2
    quiet = getattr(args, "quiet", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines())
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler],
                        force=True)
    try:
        output: str | None
        if args.command == "data":
            output = data_command(args)
        elif args.command == "config":  # touches no file and no device
            output = config_command(args, sys.argv[1:] if argv is None else argv)
        else:
            check_command(args)  # every value, before any data is read
            device = dist.resolve_device(args.device)
            # The config for the data (it must fit), before the run dir exists.
            if args.command == "run":
                args.resolved = config_for(run_options(args), dataset_of(args))
            elif args.command == "train" and args.model in ("classifier", "vae"):
                args.resolved = train_configs(args, shape_of(dataset_of(args)))
                config, train_config, _ = args.resolved
                check_batches(dataclasses.replace(config, **{f"{args.model}_train": train_config}),
                              dataset_of(args), args.model)
            elif args.command == "train":
                args.resolved = train_configs(args, run_shape(RunDir(args.run_dir)))
            check_precisions(args, device)  # fp16 on the CPU: refused before any file
            dist.init(device)
            # `ldm run` takes the lock in the function it shares with `latentdiffusion.run`
            writes = args.command in ("train", "encode", "sweep")
            with run_dir_lock(args.run_dir, enabled=writes and dist.is_main()):
                output = dispatch(args, device)
        if output is not None and dist.is_main():
            _print(output)
        return 0
    except LdmError as err:
        _say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _say("interrupted; checkpoints are kept: rerun with --resume (ldm run resumes by itself)")
        return 130
    finally:
        dist.shutdown()


def _print(output: str) -> None:
    """The command's result on stdout; a reader that stops early (`| head`) is no error."""
    try:
        print(output, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def _say(line: str) -> None:
    """Print a last line on a line of its own: close the progress bars the failure left open
    (their frames live on in the exception), which ends or clears their line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(line, file=sys.stderr)
