"""The multi-process helper itself: a run that hangs is killed, started again on a fresh port,
and reported with a TimeoutError once every attempt has hung (tests/_dist_utils.py)."""
import pytest

import _dist_utils as du


def test_a_hung_run_is_retried_then_reported():
    with pytest.warns(UserWarning, match="attempt 1 of 2"):
        with pytest.raises(TimeoutError, match="2 times"):
            du.spawn(du.hang_worker, 2, timeout=5, attempts=2)
