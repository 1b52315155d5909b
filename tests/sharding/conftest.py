"""The sharding tests need 8 devices, which on a CPU means a flag read when jax starts.

They run in their own pytest process, started by ``tests/test_sharding_subprocess.py``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; run them by hand with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharding -q

In a process with fewer devices (the ordinary ``pytest`` run) nothing here is collected.

Every multi-step loop here waits for each step (``jax.block_until_ready``) before it
dispatches the next. With 8 simulated devices on a 2-core machine, XLA:CPU (jax 0.10.2)
deadlocked about one run in six when 100 steps were queued at once: seven devices sat in a
step's all-reduce while the eighth device's launch of that step waited on the runtime's
in-flight semaphore, until the rendezvous timeout aborted the process (SIGABRT; core dump
read with gdb, 2026-12-05). One step in flight at a time never showed it in 30 runs.
"""

import jax

NEEDED_DEVICES = 8

if jax.device_count() < NEEDED_DEVICES:
    collect_ignore_glob = ["*.py"]
