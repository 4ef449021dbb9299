"""ftjax.host_memory: after keep_freed_memory, a jitted step's large buffers are reused, not faulted in anew."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ftjax import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc malloc only (Linux)")

# One process: minor page faults per call of a jitted function with a 64 MB result, before and
# after keep_freed_memory (limit_arenas first, as `ftjax` does at start).
PROGRAM = textwrap.dedent("""
    import json, resource
    from ftjax import host_memory
    limited = host_memory.limit_arenas()
    import jax, jax.numpy as jnp

    double = jax.jit(lambda x: x * 2.0)
    x = jnp.ones((4096, 4096), jnp.float32)  # 64 MB

    def faults_per_call(calls=20):
        for _ in range(3):  # buffers are freed asynchronously: a few calls reach the steady state
            jax.block_until_ready(double(x))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            jax.block_until_ready(double(x))
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls

    default = faults_per_call()
    kept = host_memory.keep_freed_memory()
    print(json.dumps({"limited": limited, "kept": kept, "again": host_memory.keep_freed_memory(),
                      "default": default, "after": faults_per_call()}))
""")


def test_kept_memory_is_reused_instead_of_faulted_in_again():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    pages = 64 * 2**20 // 4096
    assert r["limited"] and r["kept"] and r["again"]
    assert r["default"] > 0.5 * pages, r  # glibc maps the 64 MB result afresh at every call ...
    assert r["after"] < 0.25 * pages, r  # ... and, once kept, reuses it (the heap grows once or twice)
