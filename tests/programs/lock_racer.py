"""Races for the workdir lock of argv[1] once file argv[2] exists; prints `won` or `refused ...` (test_reliability)."""
import os, sys, time
from hvaeood import workdir_lock
workdir, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
  time.sleep(0.001)
lock = workdir_lock.WorkdirLock(workdir)
try:
  lock.acquire()
except workdir_lock.CheckpointError as e:
  print("refused", e, flush=True)
  sys.exit(0)
print("won", flush=True)
time.sleep(3)
lock.release()
