"""UIDs that identify this implementation: shared by the network layer (A-ASSOCIATE-RQ/AC) and the storage layer
(the File Meta of every stored blob). Kept here, below both, so that neither imports the other for them."""

# A UUID-derived UID (PS3.5 B.2): needs no registered root.
IMPLEMENTATION_CLASS_UID = "2.25.91993142740427924133552079705596492658"
IMPLEMENTATION_VERSION_NAME = "APPLIANCE_010"
VERIFICATION = "1.2.840.10008.1.1"
