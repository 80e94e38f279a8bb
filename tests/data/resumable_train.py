"""A training job as a careful user writes one: a checkpoint every few steps, one more when
asked to stop (SIGTERM), and a resume from the newest checkpoint when trainstack says so.
The result is a pure function of the step count, so an interrupted-and-resumed run must end
with exactly what an uninterrupted one ends with.

    python resumable_train.py STEPS [SECONDS_PER_STEP]
"""

import glob
import json
import os
import signal
import sys
import time

total = int(sys.argv[1])
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
os.makedirs("checkpoints", exist_ok=True)
os.makedirs("results", exist_ok=True)
state = {"step": 0, "w": 1}
if os.environ.get("TRAINSTACK_RESUME") == "1":
    found = []
    for folder in os.environ.get("TRAINSTACK_RESUME_DIRS", "checkpoints").split(","):
        found += glob.glob(os.path.join(folder, "step-*.json"))
    if found:
        with open(max(found, key=os.path.basename)) as handle:
            state = json.load(handle)
    print(f"resumed at step {state['step']} from {os.environ.get('TRAINSTACK_RESUME_DIRS')}", flush=True)


def save():
    snapshot = state  # one name lookup: a signal between two steps sees one whole state
    with open(".checkpoint.tmp", "w") as handle:
        json.dump(snapshot, handle)
    os.replace(".checkpoint.tmp", f"checkpoints/step-{snapshot['step']:05d}.json")


def stop(*_):
    save()
    print(f"checkpointed at step {state['step']} on SIGTERM", flush=True)
    sys.exit(143)


signal.signal(signal.SIGTERM, stop)
while state["step"] < total:
    step = state["step"] + 1
    state = {"step": step, "w": (state["w"] * 31 + step) % 1000003}
    if step % 3 == 0:
        save()
    time.sleep(delay)
save()
with open("results/final.json", "w") as handle:
    json.dump(state, handle)
print(f"done: {json.dumps(state)}", flush=True)
