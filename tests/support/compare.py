"""Comparing DICOM files as a PACS keeps them: the data set after the file meta.

A PACS may rewrite the file meta information (group 0002: its own implementation
UID, the source AE title) but must keep the data set byte for byte.
"""

from pathlib import Path

from pynetdicom.dsutils import split_dataset


def dataset_bytes(path: Path) -> bytes:
    """Return the encoded data set that follows the file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def dataset_bytes_of(data: bytes, scratch: Path) -> bytes:
    """Return :func:`dataset_bytes` of a file given as bytes, via ``scratch``."""
    scratch.write_bytes(data)
    return dataset_bytes(scratch)
