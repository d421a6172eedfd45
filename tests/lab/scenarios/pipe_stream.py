"""Guest side of the pipe scenario: stream bytes through a pipe between two processes while
pipe_write is switched among its editions, and report digests and counts as JSON."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import threading
import time

from dynamos.kernel.editions import function_control, switch

UPDATE, FUNCTION = "pipe-editions", "pipe_write"
total, min_switches = int(sys.argv[1]), int(sys.argv[2])
WRITE = 64 * 1024
block = os.urandom(1 << 20)
r, w = os.pipe()

writer = os.fork()
if writer == 0:
    os.close(r)
    sent = hashlib.sha256()
    left = total
    view = memoryview(block)
    while left:
        for start in range(0, min(left, len(block)), WRITE):
            chunk = view[start:start + min(WRITE, left - start)]
            sent.update(chunk)
            while chunk:
                chunk = chunk[os.write(w, chunk):]
        left -= min(left, len(block))
    os.close(w)
    with open(f"/tmp/pipe-sent-{os.getpid()}", "w") as f:
        f.write(sent.hexdigest())
    os._exit(0)

os.close(w)
received = hashlib.sha256()
count = 0
done = threading.Event()


def read_all() -> None:
    global count
    while True:
        data = os.read(r, 1 << 20)
        if not data:
            break
        received.update(data)
        count += len(data)
    done.set()


reader = threading.Thread(target=read_all)
started = time.monotonic()
reader.start()
switches = 0
for edition in itertools.cycle([1, 2, 0]):
    if done.wait(0.05):
        break
    switch(UPDATE, FUNCTION, edition)
    switches += 1
reader.join()
_, status = os.waitpid(writer, 0)
seconds = time.monotonic() - started
sent_digest = open(f"/tmp/pipe-sent-{writer}").read()
editions = [e.to_json() for e in function_control(UPDATE, FUNCTION).editions()]
switch(UPDATE, FUNCTION, None, reset=True)
json.dump({"bytes": count, "sent": sent_digest, "received": received.hexdigest(), "switches": switches,
           "writer_status": status, "seconds": seconds, "editions": editions}, sys.stdout)
