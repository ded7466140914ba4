"""The engine: the one trainer (``train``: the loop; ``run_setup``: what is built before step 1; ``run_files``: the
run folder's resume, config check and metrics), run configs (``config``, ``run_config``), network roles (``roles``),
checkpoints (``checkpoint``), a student's chain of teachers (``lineage``), output paths (``paths``), launch checks
(``launch``), LoRA (``lora``), student files (``export``) and the trajectory cache (``trajectories``). Knows no method
by name, and nothing of ``teachers`` or ``students``: what it needs from them is passed in (docs/architecture.md)."""
