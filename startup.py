"""Stop signals outside a run: every command imports this first, before torch loads (seconds, in which a
Ctrl-C printed a traceback). Any stop signal then ends the process in one line, exit 130. runtime.StopSignal
takes over while a command trains or writes, and puts this handler back after, so its last moments end alike."""
import os
import signal
import sys


def _stop(signum, frame) -> None:
    print(f"stopped: {signal.Signals(signum).name} received while nothing was being trained or written",
          file=sys.stderr, flush=True)
    os._exit(130)


for _sig in (getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)):  # no HUP: Windows
    signal.signal(_sig, _stop)
