"""The store: metadata in SQLite, content as sealed objects on disk. Knows nothing of FUSE."""
from .blocks import BlockReadError
from .store import (ROOT_INODE, DamagedMetadata, Inode, Store, StoreError, StoreLockedError, StoreOpenError,
                    WrongKeyError)

__all__ = ["BlockReadError", "DamagedMetadata", "ROOT_INODE", "Inode", "Store", "StoreError", "StoreLockedError",
           "StoreOpenError", "WrongKeyError"]
