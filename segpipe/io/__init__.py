"""File input and output: atomic writes, NIfTI, DICOM."""

from segpipe.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
