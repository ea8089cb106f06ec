"""Data: image–caption data sets, WebDataset shards, the emoji builder, embedding shards.

Import the submodules directly (``unclip.data.datasets``, ``unclip.data.emoji``…); this
package keeps ``import unclip`` light.
"""
