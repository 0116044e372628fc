"""The CPU kernels' build: a lock left by a killed build must not hang every later start."""
import os
import time

from models.cpu_kernels import STALE_LOCK_SECONDS, _drop_stale_lock


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _drop_stale_lock(lock)
    assert lock.exists()   # a build may be running: wait for it, as torch does
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    _drop_stale_lock(lock)
    assert not lock.exists()
    _drop_stale_lock(lock)   # no lock: nothing to do
