"""Memory: the peak-RSS estimate before loading (`estimate`) and the low-memory plan
(`low_memory`)."""
