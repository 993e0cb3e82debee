"""Exception hierarchy of chunkem.

Every error raised on bad user input is a :class:`ChunkemError`; the CLI
prints its message (one line naming the file and the problem) and exits
with a non-zero code, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "ChunkemError",
    "InputFileError",
    "MapFormatError",
    "ModelFormatError",
    "DataValueError",
    "GeometryError",
    "ParameterError",
    "OutputError",
]


class ChunkemError(Exception):
    """Base class of every error chunkem raises on purpose."""

    exit_code = 2


class InputFileError(ChunkemError):
    """An input file is missing, unreadable or of an unknown kind."""


class MapFormatError(InputFileError):
    """A map file is malformed: truncated, empty, bad mode, bad header."""


class ModelFormatError(InputFileError):
    """An atomic model file cannot be read or holds no atoms."""


class DataValueError(ChunkemError):
    """Map values are unusable (NaN / Inf where finite values are needed)."""


class GeometryError(ChunkemError):
    """Volumes that must be aligned are not (shape, voxel size, origin), or a
    model lies outside a map."""


class ParameterError(ChunkemError, ValueError):
    """A parameter is absurd (negative voxel size, resolution below Nyquist...)."""


class OutputError(ChunkemError):
    """An output cannot be written (not writable, would overwrite an input)."""
