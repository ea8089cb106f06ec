"""Converters between unclip's modules and other libraries' checkpoints (diffusers' unCLIP).

Each converter lives in its own module and imports nothing heavy at import time: the
foreign library is never imported here (its checkpoints arrive as config dicts and state
dicts), so converting needs only torch.
"""
