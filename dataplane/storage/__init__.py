"""Node storage: the engine protocol, the SPDK and local engines, model staging.

See `engine` for the contract the agent drives, `spdk` and `local` for the two
engines, `aligned` for the 4 KiB aligned reader the model loader uses and
`artifacts` for staging model files into a volume.
"""
