"""Holds the workdir lock of argv[1] for argv[2] seconds, after printing `held` (test_reliability, test_cli_errors)."""
import sys, time
from hvaeood import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
