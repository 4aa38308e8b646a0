"""Interactions in, records out: readers, preparation (labels, splits, histories, negatives), records on disk and the Hub."""
