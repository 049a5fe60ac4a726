"""The demo agent: a tiny task that shows the agent contract end to end."""

import os
import platform
import time

import vigil_agent as vigil

steps = int(os.environ.get("DEMO_STEPS", "3"))
print(f"hello from Vigil task {vigil.task_id()} (attempt {vigil.attempt()})", flush=True)
print(f"python {platform.python_version()} as uid {os.getuid()} in {vigil.workspace()}", flush=True)
for step in range(1, steps + 1):
    vigil.progress(step=step, of=steps)
    with open(os.path.join(vigil.workspace(), "progress.txt"), "a", encoding="utf-8") as fh:
        fh.write(f"step {step}\n")
    print(f"step {step}/{steps} done", flush=True)
    time.sleep(float(os.environ.get("DEMO_STEP_S", "0.2")))
print("demo finished", flush=True)
