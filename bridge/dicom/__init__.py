"""The DICOM side of the bridge: the listener that receives studies and the
forwarder that stores opened studies into a local PACS.

Each module is a library over pynetdicom with no knowledge of queues or HTTP.
"""
