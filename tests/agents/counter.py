"""A test agent that counts to STEPS, checkpointing its workspace after every step.

It proves resumption by what it prints: "start at N" with N > 0 only happens when an
earlier attempt's workspace was restored.
"""

import os
import time

import vigil_agent as vigil

state_file = os.path.join(vigil.workspace(), "count")
n = 0
if os.path.exists(state_file):
    with open(state_file) as fh:
        n = int(fh.read())
print(f"start at {n} resumed={int(vigil.resumed())} attempt={vigil.attempt()}", flush=True)
total = int(os.environ.get("STEPS", "10"))
while n < total:
    n += 1
    with open(state_file, "w") as fh:
        fh.write(str(n))
    ok = vigil.checkpoint({"n": n}, timeout=30)
    print(f"step {n} checkpoint={'ok' if ok else 'failed'}", flush=True)
    time.sleep(float(os.environ.get("STEP_S", "0.2")))
print(f"done at {n}", flush=True)
