"""tempfs: a FUSE filesystem for a vision system's temporary files.

Layers, each importing only the ones below it:
cli -> daemon -> fs (FUSE) -> store (SQLite metadata, blocks, packs) -> codec (lz4 + AEAD).
"""
__version__ = "0.1.0"
