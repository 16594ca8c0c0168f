"""Benchmarks of the model: on the host (`host.py`: the Scorer's posts/s, batch latency, FLOPs per post, the
machine's matmul rate) and on a device (`device.py`: from tensors already there, serving from JPEG bytes, the
training loop). They sit above every other layer and below the CLIs (`mmsent bench`, `scripts/device_check.py`)."""
