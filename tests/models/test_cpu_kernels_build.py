"""The CPU kernels' build: a lock left by a killed build must not hang every later start."""
import subprocess
import sys
import threading

from models.cpu_kernels import _exclusive_build


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    # a build killed while holding both locks: torch's file stays, the flock dies with it
    child = subprocess.run(
        [sys.executable, "-c",
         "import os, pathlib, signal\n"
         "from models.cpu_kernels import _exclusive_build\n"
         f"d = pathlib.Path({str(tmp_path)!r})\n"
         "with _exclusive_build(d):\n"
         "    (d / 'lock').touch()\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n"],
        timeout=60)
    assert child.returncode == -9 and (tmp_path / "lock").exists()
    with _exclusive_build(tmp_path):   # would hang in torch's wait if the lock stayed
        assert not (tmp_path / "lock").exists()


def test_a_live_build_is_waited_for(tmp_path):
    order = []
    with _exclusive_build(tmp_path):
        def second():
            with _exclusive_build(tmp_path):
                order.append("second")
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()   # blocked while the first build holds the lock
        (tmp_path / "lock").touch()   # torch's lock of the live build: not removed under it
        order.append("first")
        assert (tmp_path / "lock").exists()
        (tmp_path / "lock").unlink()
    thread.join(timeout=10)
    assert order == ["first", "second"]
