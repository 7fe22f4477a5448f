#!/usr/bin/env python3
"""Measures the GPU's device-to-device copy bandwidth (bytes read + written per second), the ceiling that
memory-bound decode throughput is reported against. Prints and writes JSON."""
import json
import sys

import torch

n = 1 << 30  # 1 GiB
src = torch.empty(n, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record()
    dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
times.sort()
bw = 2 * n / times[len(times) // 2]
print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s (median of 20, 1 GiB, read+write)")
if len(sys.argv) > 1:
    json.dump({"copy_bandwidth_bytes_per_s": bw, "device": torch.cuda.get_device_name()}, open(sys.argv[1], "w"))
