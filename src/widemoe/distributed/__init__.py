"""Training on several processes or GPUs: torchrun's environment (`env`), the layout and its meshes
(`dims`), expert parallelism behind the dispatch seam (`dispatcher`), FSDP2 + EP on a built model
(`parallelize`) and the gradient-side collectives (`grads`). PyTorch's own stack only: DeviceMesh,
`fully_shard`, DTensor, `all_to_all_single`, Distributed Checkpoint (see `widemoe.train.dcp`).
"""
