"""Layer 1, what a run leaves behind: its folder, checkpoints, progress lines and tables.

``results`` is the sole writer of run folders; ``checkpoint`` saves and loads bit-identical
resume points (safetensors, no pickle); ``saved_config`` reads a folder's config without
trusting it; ``progress`` is what a run says on stderr; ``tables`` reads folders as pandas.
Imports only the base modules.
"""
