"""The receiving side: open verified envelopes, forward instances to local PACS."""
