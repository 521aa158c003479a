"""Stop signals before a run starts: `python train.py` and `python experiment.py` import this first.

Loading torch takes seconds, and until a run installs runtime.StopSignal a Ctrl-C would print a
KeyboardInterrupt traceback (SIGTERM and SIGHUP would end it without a word). From here on any of
them ends the process with one line and exit 130; StopSignal puts this handler back when a run
ends, so a signal in a run's last moments ends the same way. Nothing else happens at import.
"""
import os
import signal
import sys


def _stop(signum, frame) -> None:
    print(f"stopped: {signal.Signals(signum).name} received outside a run (while starting or ending); no "
          f"training was lost", file=sys.stderr, flush=True)
    os._exit(130)


for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
    if hasattr(signal, _name):  # SIGHUP is absent on Windows
        signal.signal(getattr(signal, _name), _stop)
