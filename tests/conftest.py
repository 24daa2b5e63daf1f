"""Shared pytest fixtures. The test session is a launcher: it sets the XLA:CPU default the launchers set, after
the test processes' code generation level (helpers.set_test_xla_flags)."""

import fcntl
import os
import pathlib

import pytest

import helpers
import hvaeood

helpers.set_test_xla_flags()  # before any test starts JAX's CPU backend
hvaeood.set_xla_cpu_defaults()

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Offline IDX sources (see ../shared/data/README.md); overridable by env vars.
FASHION_MNIST_SRC = os.environ.get('HVAEOOD_FASHION_MNIST_SRC',
                                   '/usr/share/datasets/fashion-mnist')
MNIST_SRC = os.environ.get('HVAEOOD_MNIST_SRC',
                           str(_REPO.parent / 'shared' / 'data' / 'mnist'))
_NEEDED = [
    os.path.join(FASHION_MNIST_SRC, f)
    for f in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
] + [os.path.join(MNIST_SRC, f)
     for f in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')]


@pytest.fixture(scope='session')
def idx_source_dirs() -> dict:
  """Directories of the offline IDX files, by TFDS name."""
  return {'fashion_mnist': FASHION_MNIST_SRC, 'mnist': MNIST_SRC}


@pytest.fixture(scope='session')
def tfds_data_dir(tmp_path_factory) -> str:
  """TFDS data_dir with real FashionMNIST (train+test) and MNIST (test).

  Imported once per session with `hvaeood.data_import`; set
  HVAEOOD_TEST_DATA_DIR to keep the import between sessions.
  """
  missing = [p for p in _NEEDED if not os.path.isfile(p)]
  if missing:
    pytest.skip(f'offline IDX files not found: {missing} (FashionMNIST: apt '
                'package dataset-fashion-mnist; MNIST test: ../shared/data/'
                'mnist; or set HVAEOOD_FASHION_MNIST_SRC / HVAEOOD_MNIST_SRC)')
  from hvaeood import data_import  # pylint: disable=g-import-not-at-top
  data_dir = (os.environ.get('HVAEOOD_TEST_DATA_DIR') or
              str(tmp_path_factory.mktemp('tfds_data')))
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.hvaeood_import.lock'), 'a+') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # test processes of one session (pytest-xdist workers) import in turn
    data_import.import_idx('fashion_mnist', FASHION_MNIST_SRC, data_dir)
    data_import.import_idx('mnist', MNIST_SRC, data_dir)
  return data_dir


# The slowest modules, slowest first (seconds per module in the clean-clone CI runs of benchmarks/README.md).
# Under `-n 2 --dist loadfile` each file runs on one worker, and a worker holds its running file plus the next;
# pytest-xdist hands files out largest test count first, which sent test_distributed.py (4 tests, ~450 s) last,
# so one worker idled for 5-6 minutes at the end. These go first, in this order; the rest keep collection order.
SLOWEST_MODULES = ("test_evaluate.py", "test_distributed.py", "test_train.py", "test_reliability.py",
                   "test_biva.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: schedule files in collection order
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, the order is kept


_MODULE_SECONDS: dict = {}


def pytest_runtest_logreport(report):
  module = report.nodeid.split('::')[0]
  _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
  """Where the suite's time goes: seconds per test module (setup + call + teardown; the background chains of a
  module count where a test waits for them) and the CPU seconds of this process and of its subprocesses."""
  import resource  # pylint: disable=import-outside-toplevel
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  rows = sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1])
  terminalreporter.write_line('seconds per module: ' + ', '.join(f'{m.split("/")[-1]} {s:.0f}' for m, s in rows))
  terminalreporter.write_line(f'CPU seconds: pytest {me.ru_utime + me.ru_stime:.0f}, subprocesses '
                              f'{kids.ru_utime + kids.ru_stime:.0f}')
