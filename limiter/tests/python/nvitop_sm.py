"""What nvitop's API shows for each process on GPU 0: its per-process SM utilisation, which nvitop
reads from nvmlDeviceGetProcessUtilization (a node-side monitor, run without the preload).
argv[1] readings, argv[2] seconds apart. Prints one JSON object: {"readings": [{pid: sm, ...}]}
(sm as nvitop gives it: a number, or "N/A" when NVML had no sample for the process)."""

import json
import sys
import time

from nvitop import Device

count, gap = int(sys.argv[1]), float(sys.argv[2])
device = Device(0)
readings = []
for _ in range(count):
    processes = device.processes()
    readings.append({str(pid): p.gpu_sm_utilization() for pid, p in processes.items()})
    time.sleep(gap)
print(json.dumps({"readings": readings}, default=str))
