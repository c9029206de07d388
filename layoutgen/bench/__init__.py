"""layoutgen.bench: the `layoutgen bench` and `layoutgen profile` commands' machinery.

- timing.py: warm-up / repeats / median (CUDA events on a GPU, perf_counter on a CPU) and peak memory;
- machine.py: machine, card, versions, commit, and the measured copy bandwidth (the ceiling for GB/s);
- ops.py: the per-op suites (GroupNorm+SiLU, attention, noise ops, data loading), defined in suites/<op>.py (which
  benchmarks/bench_<op>.py wrap as scripts);
- models.py: autoencoder and UNet training steps: ours vs the eager reference vs torch.compile (vs diffusers);
- compile_matrix.py: {eager, compile default, max-autotune} x {reference, fused ops} x {fp32, bf16}, graph breaks;
- report.py, tables.py: JSON, CSV, markdown and PNG plots;
- run.py: `run_bench`, what the command calls; profile.py: `layoutgen profile`.
"""
