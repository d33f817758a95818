"""References for the tests and benchmarks: PyTorch twins of our models, written from the published descriptions.

`torch_twins` imports torch: run it in a process without Jittor (the tests' spawned `torch_worker`, or a
benchmark's own subprocess); the two frameworks have crashed together in one process.
"""
