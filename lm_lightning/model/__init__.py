"""The model side: the LightningModule, its loss and optimizer, checkpoints, faults, FLOPs and sharding."""
