"""Without a GPU, Triton kernels run in the CPU interpreter: set it before anything imports
triton, so the same tests exercise the kernels in CI.

A test that hangs (e.g. a kernel waiting on a barrier that is never signalled) fails the
run instead of stalling it: after CT_TEST_TIMEOUT seconds (default 900) the process prints
every thread's traceback to the terminal and exits with an error, which pytest-xdist reports
as a crashed worker and a plain pytest run as a failed command."""
import faulthandler
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEST_TIMEOUT = float(os.environ.get("CT_TEST_TIMEOUT", "900"))


@pytest.fixture(scope="session")
def terminal_stderr(request):
    """The terminal's stderr (pytest captures file descriptor 2 while tests run)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:  # run with -p no:capture
        stderr = os.fdopen(os.dup(2), "w")
    else:
        with capture.global_and_fixture_disabled():
            stderr = os.fdopen(os.dup(2), "w")
    yield stderr
    stderr.close()


@pytest.fixture(autouse=True)
def fail_if_hung(terminal_stderr):
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=terminal_stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
