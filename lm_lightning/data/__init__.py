"""Texts to batches: sources, tokenizers, packing into blocks, streaming, and the LightningDataModule."""
