"""jmix-bridge: a DICOM gateway that carries studies between sites in JMIX envelopes."""

__version__ = "0.1.0"
