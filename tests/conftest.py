"""Fixtures every test module may use."""

from tests.support.dcmtk import storescp  # noqa: F401  (re-exported fixture)
from tests.support.orthanc import orthanc  # noqa: F401  (re-exported fixture)
