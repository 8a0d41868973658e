"""Inference engine: requests and workloads, per-rank scheduler, sampling, metrics, KV cache and step runner.

Host side (numpy, no device): `workload` -> `scheduler` -> `metrics`. Device side: `sampling`, `paged_cache`,
`runner`. Import the submodules directly; this package re-exports nothing.
"""
