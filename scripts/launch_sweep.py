#!/usr/bin/env python3
"""Launch a robust-train sweep in the background and say where everything lands.

    scripts/launch_sweep.py +method=erm,at seed=0,1,2 hydra/launcher=joblib
    scripts/launch_sweep.py experiment=cifar10_at seed=0,1 hydra/launcher=slurm_gpu \
        hydra.launcher.partition=gpu

Every argument is a robust-train override (the sweep runs `robust-train -m <overrides>`); the options below
are this script's. The sweep directory is fixed up front (`hydra.sweep.dir`), so it is known before any
job starts: one subdirectory per run (named after its overrides) with train.log, results.json and
status.json; the sweep's own output goes to <sweep dir>/sweep.log, its process id to sweep.pid, and its
exit status to sweep.exit when it ends. The sweep keeps running after this terminal closes (with SLURM
launchers the background process only waits for the jobs). Rerunning with the same --sweep-dir resumes
unfinished runs from their checkpoints (resume=auto).
"""

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path


def robust_train_command() -> list[str]:
    """robust-train next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "robust-train"
    return [str(beside)] if beside.exists() else ["robust-train"]


def default_sweep_dir(overrides: list[str]) -> Path:
    # No "=" or ",": the name becomes part of a Hydra override, where a comma would start a sweep.
    named = "_".join(o.lstrip("+~") for o in overrides if not o.startswith("hydra"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", named)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs/sweeps") / (f"{stamp}_{slug[:80]}" if slug else stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-dir", type=Path,
                        help="where the runs land (default: outputs/sweeps/<time>_<overrides>)")
    parser.add_argument("--wait", action="store_true", help="stay in the foreground until the sweep ends")
    parser.add_argument("--dry-run", action="store_true", help="print the command and the directory only")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; robust-train overrides have no leading dashes")
    if not overrides:
        parser.error("give the sweep's overrides, e.g. +method=erm,at seed=0,1 hydra/launcher=joblib")
    if any(o.startswith("hydra.sweep.dir=") for o in overrides):
        parser.error("set the directory with --sweep-dir, not hydra.sweep.dir")

    sweep_dir = (args.sweep_dir or default_sweep_dir(overrides)).resolve()
    if "'" in str(sweep_dir):
        parser.error(f"--sweep-dir {sweep_dir} contains a single quote, which Hydra overrides cannot carry")
    command = [*robust_train_command(), "-m", *overrides, f"hydra.sweep.dir='{sweep_dir}'"]
    shown = shlex.join(command)
    if args.dry_run:
        print(shown)
        print(sweep_dir)
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.command").write_text(shown + "\n")
    (sweep_dir / "sweep.exit").unlink(missing_ok=True)
    # The shell records the exit status, so "finished" is a file anyone can wait for; its trap outlives the
    # `kill -TERM -<pid>` that stops the sweep (the runs checkpoint and exit 143), so the status is written.
    script = f"trap true TERM INT; {shown}; echo $? > {shlex.quote(str(sweep_dir / 'sweep.exit'))}"
    with open(sweep_dir / "sweep.log", "ab") as log:
        process = subprocess.Popen(["/bin/sh", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
    (sweep_dir / "sweep.pid").write_text(f"{process.pid}\n")
    print(f"sweep started in the background (pid {process.pid}): {shown}")
    print(f"  runs:     {sweep_dir}/<overrides>/  (results.json, train.log, status.json in each)")
    print(f"  progress: tail -f {sweep_dir / 'sweep.log'}")
    print(f"  finished: when {sweep_dir / 'sweep.exit'} exists (it holds the exit status)")
    print(f"  stop:     kill -TERM -{process.pid}  (runs checkpoint; relaunch with --sweep-dir to resume)")
    if args.wait:
        try:
            process.wait()
        except KeyboardInterrupt:  # the sweep runs in its own session: pass Ctrl-C on, and wait for its checkpoints
            os.killpg(process.pid, signal.SIGINT)
            process.wait()
        exit_file = sweep_dir / "sweep.exit"
        return int(exit_file.read_text().strip() or 1) if exit_file.exists() else 128 + signal.SIGKILL
    return 0


if __name__ == "__main__":
    sys.exit(main())
