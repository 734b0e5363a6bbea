"""Built-in, procedurally generated tasks with rule-based judges."""
