"""A test whose CUDA kernel faults must not fail every test after it.

A kernel that faults (an illegal or misaligned address, a device-side assert) leaves a
sticky error in the process's CUDA context: every later CUDA call in that process fails
with it, so one bad kernel would turn every later GPU test red with the same message, and
hide which kernel it was. After a failed test (any phase) this plugin asks whether the
context is still usable (:func:`fastmae._timing.cuda_context_lost`; only on failure, and
only once CUDA has been started, so passing tests pay nothing):

* in a pytest-xdist worker, the worker ends at once: xdist reports the test as crashed,
  naming it, and starts a fresh worker (with a fresh context) for the tests left
  (``--max-worker-restart``, by default four per worker);
* in a plain pytest run, the session stops after this test with the message
  "CUDA context lost in <test>: <error>" (the later tests could not run in this process).

Hooked in by tests/conftest.py.
"""

import os
import sys

import pytest


def _probe() -> str | None:
    if "torch" not in sys.modules:
        return None
    from fastmae import _timing

    return _timing.cuda_context_lost()


probe = _probe  # looked up at each call (a test of this plugin replaces it)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    lost = probe()
    if lost is None:
        return
    msg = f"CUDA context lost in {item.nodeid} ({rep.when}): {lost}"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"\n{msg}; ending this worker so that a fresh one runs the tests left\n")
        sys.stderr.flush()
        os._exit(3)
    item.session.shouldstop = msg
