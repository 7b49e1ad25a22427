"""Curation: the sample schema, source readers, probing, dedup, shards and the ledger."""
