"""fastmine benchmark suite.

``python -m benchmarks.mine`` sweeps every available provider (fastmine
backends, pytorch-metric-learning miners, optional KeOps, and the blocked
matmul floor) on the same random data; ``python -m benchmarks.report`` turns a
results JSON back into the Markdown table used in the README.
"""
