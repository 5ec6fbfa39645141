//! Tasks: the jigsaw generator and scorer, synthetic prior-knowledge suites, JSONL datasets.
