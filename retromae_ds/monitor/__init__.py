"""What a training run reports: metrics.jsonl + TensorBoard, throughput/FLOPs/MFU, a progress bar, a profile.

One module per concern, driven by the trainer; the writers are quiet on ranks other than 0 (pass
`enabled=False`):

- `metrics.py`: `MetricsLogger` writes OUTPUT_DIR/metrics.jsonl and the TensorBoard scalars (the tag
  scheme is in its docstring); `read_metrics` reads the file back.
- `throughput.py`: `Throughput` turns per-step timings into tokens/s, samples/s, TFLOPs per device,
  MFU and peak memory.
- `flops.py`: the FLOP formula (`retromae_flops_per_sample`) that `Throughput` counts with.
- `peaks.py`: the table of peak device FLOPs (`lookup_peak_tflops`, `peak_flops_per_device`) that MFU
  divides by.
- `progress.py`: `ProgressBar`, tqdm on a terminal, plain log lines otherwise (SLURM logs).
- `profiler.py`: `StepProfiler` (--profile-steps A-B), a torch.profiler trace of a few steps plus a
  summary.

torch, tensorboard and tqdm are imported inside the functions that need them, so importing these
modules (and `retromae-ds --help`) stays instant.
"""
