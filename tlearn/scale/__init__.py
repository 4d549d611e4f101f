"""Scaling out: shards of whole batches and their part files, merging parts into the
file one process writes, the torchrun process group, and a Ray Data batch mapper."""
