"""Runs one bad-input case in a forked child with a time and address-space limit, so that a crash,
a hang or a runaway allocation fails that case instead of killing the test run.

A case is a callable run in the child. Its outcome comes back as ("ok", value) where value is what
the callable returned (it must pickle), or ("raise", "module.Type", message), or ("crash", how).
"""

import multiprocessing
import os
import resource
import signal
import subprocess
import traceback

# Time a case may take and memory it may add to what the parent already maps.
CASE_SECONDS = 30
CASE_EXTRA_BYTES = 2 << 30

_CTX = multiprocessing.get_context("fork")


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(conn, fn):
    limit = _vm_bytes() + CASE_EXTRA_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        value = fn()
        conn.send(("ok", value))
    except BaseException as e:  # noqa: BLE001 - the parent judges every outcome
        kind = f"{type(e).__module__}.{type(e).__qualname__}"
        conn.send(("raise", kind, f"{e}\n{traceback.format_exc(limit=3)}" if kind.startswith("builtins")
                   else str(e)))
    finally:
        conn.close()


def run_isolated(fn, seconds: float = CASE_SECONDS):
    parent, child = _CTX.Pipe(duplex=False)
    p = _CTX.Process(target=_child, args=(child, fn))
    p.start()
    child.close()
    try:
        if not parent.poll(seconds):
            p.kill()
            p.join()
            return ("crash", f"no result within {seconds} s (hang)")
        try:
            result = parent.recv()
        except EOFError:
            result = None
        p.join(seconds)
        if p.exitcode is None:
            p.kill()
            p.join()
            return ("crash", "did not exit after sending its result")
        if result is None:
            code = p.exitcode
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            return ("crash", f"the case died without a result ({how})")
        return result
    finally:
        parent.close()


def run_cli(args, seconds: float = CASE_SECONDS, extra_bytes: int = CASE_EXTRA_BYTES):
    """Runs a command with a time and address-space limit: (returncode, stdout, stderr), returncode
    None when it ran past `seconds`."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (extra_bytes, extra_bytes))

    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=seconds, preexec_fn=limit,
                           stdin=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired as e:
        return None, e.stdout or "", e.stderr or ""
    return r.returncode, r.stdout, r.stderr
