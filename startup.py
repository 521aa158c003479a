"""Stop signals outside a run: train.py and experiment.py import this first, before torch loads (seconds,
in which a Ctrl-C printed a traceback). Any stop signal then ends the process in one line, exit 130;
runtime.StopSignal puts this handler back when a run ends, so its last moments end the same way."""
import os
import signal
import sys


def _stop(signum, frame) -> None:
    print(f"stopped: {signal.Signals(signum).name} received outside a run (while starting or ending); no "
          f"training was lost", file=sys.stderr, flush=True)
    os._exit(130)


for _sig in (getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)):  # no HUP: Windows
    signal.signal(_sig, _stop)
