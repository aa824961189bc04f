"""Token shards, the distributed loader, and the corpora that produce shards."""
