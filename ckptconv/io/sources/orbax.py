"""The Orbax PyTree format: an item folder with ``_METADATA`` (or older Orbax's msgpack tree).

Arrays live in one OCDBT database or in one zarr folder each; both are read by
:class:`~ckptconv.io.CheckpointReader`, which also offers the copy capability (encoded chunks
copied verbatim) and, for OCDBT, cloning the database files.
"""

from __future__ import annotations

from .. import _format as fmt
from ..location import Location
from ..reader import CheckpointReader


class _OrbaxFormat:
    name = "orbax"
    description = "Orbax item with _METADATA, OCDBT or one zarr folder per array"

    def detect(self, location: Location) -> bool:
        try:
            if not location.is_dir():
                return False
            names = set(location.list_dir())
        except Exception:  # noqa: BLE001 - detection never raises; open() reports
            return False
        markers = {fmt.METADATA_FILE, fmt.OCDBT_MANIFEST_FILE, fmt.LEGACY_MSGPACK_FILE}
        if names & markers:
            return True
        # A CheckpointManager step folder (items/, default/, state/) or root (numeric steps).
        return bool(names & set(fmt.STEP_ITEM_NAMES)) or any(n.isdigit() for n in names)

    def open(self, location: Location) -> CheckpointReader:
        return CheckpointReader(location)


FORMAT = _OrbaxFormat()
