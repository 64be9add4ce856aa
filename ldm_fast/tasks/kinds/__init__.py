"""One file per paper task, each registering its `Task` (ldm_fast.tasks.registry) on import."""
