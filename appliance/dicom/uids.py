"""UIDs that identify this implementation: shared by the network layer (A-ASSOCIATE-RQ/AC) and the storage layer
(the File Meta of every stored blob). Kept here, below both, so that neither imports the other for them."""

# A UUID-derived UID (PS3.5 B.2): needs no registered root.
IMPLEMENTATION_CLASS_UID = "2.25.91993142740427924133552079705596492658"
IMPLEMENTATION_VERSION_NAME = "APPLIANCE_010"
VERIFICATION = "1.2.840.10008.1.1"

# Query/Retrieve information models (PS3.4 C.6): the FIND, MOVE and GET SOP classes of the two models served.
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_MODELS = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)
MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
QUERY_RETRIEVE_MODELS = (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)

# Storage Commitment Push Model (PS3.4 J.3): the SOP class and its well-known SOP instance.
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_PUSH_INSTANCE = "1.2.840.10008.1.20.1.1"
