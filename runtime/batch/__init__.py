"""`sdrt batch`: a JSONL file of jobs run locally (`runner`) or on a Ray cluster (`ray_engine`)."""
